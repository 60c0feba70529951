"""Thin entry point to the benchmarks in the library: ``python benchmarks/bench.py [--quick] [--json]
[--device cpu|cuda] [--precision auto|bf16|fp32] [--batch-search MAX]`` is ``qvlm bench ...``.
The code lives in ``src/qvlm/bench/``; current numbers are in docs/performance.md."""

import sys

from qvlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
