"""Run the zbus benchmark harness: `python benchmarks/run.py --help` (see benchmarks/README.md)."""

import os
import sys

if __name__ == "__main__":
    # Run from a checkout without installing: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from zbus.bench.harness import main

    sys.exit(main())
