"""`python -m zbus.bench [args]`: the benchmark harness (same as benchmarks/run.py)."""

import sys

from zbus.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
