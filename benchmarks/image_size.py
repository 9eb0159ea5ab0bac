"""An ESTIMATE of deploy/Dockerfile's image size, by layer, from the lock: no image is built.

    python -m benchmarks.image_size [--top 15]

Base images cannot be pulled on the development machines, so nothing is measured in a real image.
The virtual-environment layer is estimated as the installed size of each package that
deploy/lock/image.txt locks, taken from this environment: the sizes its RECORD lists (the files pip
wrote, bytecode included), for the locked version only. A package installed here at another version,
or not at all, is listed and counted as 0. The code layer is the repository's pyproject.toml,
README.md and gcmlm_assets/ (copied to /src) twice: that copy plus its installed copy in the venv,
without bytecode. The base image (nvidia/cuda ...-cudnn-runtime-ubuntu22.04) and Ubuntu's python3.11
are not included: their size is whatever the registry reports for the tag. "CUDA-only" is what a CPU
image would not carry: the nvidia-* and cuda-* wheels and triton (torch's CPU wheel is smaller
still, but is not installed here to measure).
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "deploy" / "lock" / "image.txt"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$", re.M)
CODE = ("pyproject.toml", "README.md", "gcmlm_assets")


def locked_versions(lock: Path) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in ENTRY.findall(lock.read_text(encoding="utf-8"))}


def installed_size(name: str, version: str) -> int | None:
    """Bytes pip recorded for this distribution; None where this environment has another version."""
    try:
        distribution = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    if distribution.version != version:
        return None
    total = 0
    for file in distribution.files or []:
        if file.size is not None:
            total += file.size
        else:  # RECORD leaves out the size of RECORD itself and of files written after install
            path = Path(file.locate())
            total += path.stat().st_size if path.is_file() else 0
    return total


def is_cuda_only(name: str) -> bool:
    return name.startswith(("nvidia-", "cuda-")) or name == "triton"


def code_bytes() -> int:
    total = 0
    for relative in CODE:
        path = REPO / relative
        files = [path] if path.is_file() else [
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        total += sum(f.stat().st_size for f in files)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15, help="largest packages listed one by one")
    args = parser.parse_args()

    sizes: dict[str, int] = {}
    absent: list[str] = []
    for name, version in locked_versions(LOCK).items():
        size = installed_size(name, version)
        if size is None:
            absent.append(f"{name}=={version}")
        sizes[name] = size or 0

    mb = 1e6
    venv = sum(sizes.values())
    cuda_only = sum(size for name, size in sizes.items() if is_cuda_only(name))
    print(f"ESTIMATE from {LOCK.relative_to(REPO)} ({len(sizes)} packages) and this environment's "
          "installed sizes; see the docstring for how. Not a measured image.\n")
    print(f"{'package':<32}{'MB':>10}")
    for name, size in sorted(sizes.items(), key=lambda item: -item[1])[:args.top]:
        print(f"{name:<32}{size / mb:>10,.0f}")
    print(f"{'... the other ' + str(max(len(sizes) - args.top, 0)):<32}"
          f"{sum(sorted(sizes.values(), reverse=True)[args.top:]) / mb:>10,.0f}")
    print()
    print(f"{'layer':<48}{'MB':>10}")
    print(f"{'virtual environment (COPY --from=deps)':<48}{venv / mb:>10,.0f}")
    print(f"{'  of which CUDA-only (nvidia-*, cuda-*, triton)':<48}{cuda_only / mb:>10,.0f}")
    print(f"{'code (/src and its installed copy)':<48}{2 * code_bytes() / mb:>10,.1f}")
    print(f"{'base image and python3.11':<48}{'not included':>10}")
    if absent:
        print(f"\ncounted as 0, not installed here at the locked version: {', '.join(absent)}")


if __name__ == "__main__":
    main()
