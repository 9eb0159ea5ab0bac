"""The one error of a slide that cannot be used (slides.py and dicom_wsi.py raise it; neither imports the other for it)."""

from __future__ import annotations

import os
from pathlib import Path


class SlideError(Exception):
    """A slide that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path.name}: {problem} ({self.path})")
