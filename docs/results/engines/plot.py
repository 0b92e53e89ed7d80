"""Speed per engine x configuration from `mtp bench engine` results: python plot.py OUT.png A.json B.json ..."""

import sys

from mtp.bench.engine import load_results, plot_bench_engine

if __name__ == "__main__":
    plot_bench_engine(load_results(sys.argv[2:]), sys.argv[1])
