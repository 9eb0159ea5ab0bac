"""Where things live, read from the environment once.

`GCMLM_DATA_ROOT` (default `./data`) holds the landing zone, the artifacts and
the Dagster home; each can be moved on its own with its own variable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("GCMLM_DATA_ROOT", "data")).resolve()


def landing_root() -> Path:
    return Path(os.environ.get("GCMLM_LANDING_ROOT", data_root() / "landing")).resolve()


def artifacts_root() -> Path:
    return Path(os.environ.get("GCMLM_ARTIFACTS_ROOT", data_root() / "artifacts")).resolve()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME", data_root() / "dagster_home")).resolve()


def environment() -> str:
    """`local` (default) or `k8s`: selects executor and resources."""
    env = os.environ.get("GCMLM_ENV", "local").strip().lower()
    if env not in ("local", "k8s"):
        raise ValueError(f"GCMLM_ENV must be 'local' or 'k8s', got {env!r}")
    return env


@contextlib.contextmanager
def scoped_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block only; each is restored (or removed) afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
