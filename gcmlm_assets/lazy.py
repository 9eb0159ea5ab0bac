"""A heavy third-party library imported on first use, so that loading the definitions stays light.

Every step process (and the code server, and each sensor tick's process) imports the definitions;
the heavy libraries (numpy, pyarrow, torch, scikit-learn, SimpleITK, PyRadiomics, OpenCV, OpenSlide,
...) are needed only by the steps that compute with them. A module names such a library through
`np = lazy("numpy")`: the first attribute access imports the real module (Python caches it in
sys.modules). Type checkers see the real module when the import sits under `if TYPE_CHECKING:`
with the proxy in its `else:` branch.

lazy() is only for heavy third-party libraries. The project's own modules are imported as usual,
so that readers, IDEs and type checkers see the wiring; a plain module that the definitions import
keeps its heavy libraries behind lazy() or inside the functions that use them
(gcmlm_assets_tests/core/test_definitions.py fails when either rule is broken).
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
