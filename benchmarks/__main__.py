"""`python -m benchmarks` lists the benchmarks; run one with `python -m benchmarks.<name>`."""

import pkgutil

import benchmarks

for module in pkgutil.iter_modules(benchmarks.__path__):
    if not module.name.startswith("_"):
        print(f"python -m benchmarks.{module.name}")
