"""The environment is read in settings.py and profiles.py only: every other module asks them."""

from __future__ import annotations

import ast
from pathlib import Path

import gcmlm_assets

PACKAGE = Path(gcmlm_assets.__file__).parent
READERS = {PACKAGE / "settings.py", PACKAGE / "profiles.py"}
# os's ways to the environment
ENVIRONMENT_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def environment_uses(source: str) -> list[int]:
    """Line numbers where `source` reaches the environment through `os` (os.environ,
    os.getenv(...), `from os import environ`, ...)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT_NAMES
                and isinstance(node.value, ast.Name) and node.value.id == "os"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                alias.name in ENVIRONMENT_NAMES for alias in node.names):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_scan_finds_each_way_to_the_environment():
    source = ("import os\nfrom os import environ\na = os.environ['A']\nb = os.getenv('B')\nos.environ['C'] = '1'\n"
              "path = os.path.join('x')\n")
    assert environment_uses(source) == [2, 3, 4, 5]


def test_only_settings_and_profiles_read_the_environment():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert READERS <= set(sources)
    offenders = {str(path.relative_to(PACKAGE)): lines for path in sources if path not in READERS
                 if (lines := environment_uses(path.read_text(encoding="utf-8")))}
    assert offenders == {}, "read the variable through a function of settings.py (or profiles.py)"
    assert all(environment_uses(path.read_text(encoding="utf-8")) for path in READERS)
