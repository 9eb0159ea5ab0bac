"""What may be read of the landing zone: a symbolic link leading out of it never is.

Below the landing package and the domains, so that the shared `LandingZone` resource and the
landing sensor's scan refuse the same links with the same message.
"""

from __future__ import annotations

import os


class LandingInputError(ValueError):
    """A drop that must not be read (a link leading out of the landing zone); the message names it."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def link_leaving(path: str | os.PathLike, root: str | os.PathLike) -> str | None:
    """Where the symbolic link `path` leads when that is outside `root` (both resolved), else None.
    Only path names are resolved: the target itself is never opened."""
    if not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    return None if _inside(target, os.path.realpath(root)) else target


def links_leaving(folder: str | os.PathLike, root: str | os.PathLike) -> list[tuple[str, str]]:
    """(path, target) of every symbolic link under `folder`, at any depth, that leads outside `root`.
    Links that stay inside are followed when they are folders (each real folder once)."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    pending = [os.fspath(folder)]
    while pending:
        current = pending.pop()
        real = os.path.realpath(current)
        if real in seen or not os.path.isdir(current):
            continue
        seen.add(real)
        with os.scandir(current) as it:
            for entry in sorted(it, key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue  # hidden names are read by no one (as in the sensor's walk)
                target = link_leaving(entry.path, root)
                if target is not None:
                    found.append((entry.path, target))
                elif entry.is_dir(follow_symlinks=True):
                    pending.append(entry.path)
    return found


def describe_links_leaving(links: list[tuple[str, str]], root: str | os.PathLike) -> str:
    shown = "; ".join(f"{path} is a symbolic link to {target}" for path, target in links[:5])
    more = f" (and {len(links) - 5} more)" if len(links) > 5 else ""
    return (f"{shown}{more}: outside the landing zone {root}, refused (no file outside the landing zone is "
            "read); copy the file into the drop and touch READY")
