"""How long loading the definitions takes, and how much memory: what every step process pays.

    python -m benchmarks.definitions_import [--repeats 5]

Each row starts a fresh Python process (as a run or step process does) and imports
`gcmlm_assets.definitions` (or just `dagster`, the floor), then exits; wall seconds from the
parent and the child's peak RSS (ru_maxrss). Medians over the repeats. Under GCMLM_ENV=k8s the
definitions also import dagster-k8s for the executor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = [
    ("import dagster", "import dagster", {}),
    ("import gcmlm_assets.definitions (local)", "import gcmlm_assets.definitions", {"GCMLM_ENV": "local"}),
    ("import gcmlm_assets.definitions (k8s)", "import gcmlm_assets.definitions", {"GCMLM_ENV": "k8s"}),
]
MEASURE = ("import resource, sys\n{code}\n"
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def measure(code: str, env: dict[str, str]) -> tuple[float, float]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE.format(code=code)], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout
    wall = time.perf_counter() - started
    return wall, int(out.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    measure("pass", {})  # warm the file cache
    print(f"fresh-process imports, median of {args.repeats} (cpus {os.cpu_count()})\n")
    print(f"| {'what':<42} | {'wall s':>7} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 44}|{'-' * 9}|{'-' * 13}|")
    for label, code, env in CASES:
        runs = [measure(code, env) for _ in range(args.repeats)]
        print(f"| {label:<42} | {statistics.median(w for w, _ in runs):>7.2f} "
              f"| {statistics.median(m for _, m in runs):>11.0f} |")


if __name__ == "__main__":
    main()
