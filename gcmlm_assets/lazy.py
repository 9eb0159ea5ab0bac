"""A module imported on first use, so that loading the definitions stays light.

Every step process (and the code server, and each sensor tick's process) imports the definitions;
the heavy libraries (torch, scikit-learn, SimpleITK, PyRadiomics, OpenCV, OpenSlide, pyarrow, ...)
are needed only by the steps that compute with them. The Dagster wiring modules name them through
`lazy(...)`: the first attribute access imports the real module (Python caches it in sys.modules).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    def __init__(self, name: str):
        self._name = name

    def _module(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attr: str):
        return getattr(self._module(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str) -> LazyModule:
    return LazyModule(name)
