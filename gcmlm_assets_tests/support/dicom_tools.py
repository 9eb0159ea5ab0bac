"""dicom3tools' `dciodvfy`, which checks a DICOM object against the standard's module definitions."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

INSTALL = "Debian package dicom3tools: apt-get install dicom3tools"


def dciodvfy() -> str:
    """Its path; the test skips without it, or fails under GCMLM_REQUIRE_DCIODVFY=1 (CI installs it)."""
    path = shutil.which("dciodvfy")
    if path is None:
        message = f"dciodvfy not installed ({INSTALL})"
        if os.environ.get("GCMLM_REQUIRE_DCIODVFY") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def dciodvfy_report(path) -> list[str]:
    """dciodvfy's lines about the file at `path` (errors start with "Error", warnings with "Warning")."""
    result = subprocess.run([dciodvfy(), str(path)], capture_output=True, text=True, encoding="utf-8",
                            errors="replace", timeout=60, check=False)
    return (result.stdout + result.stderr).splitlines()
