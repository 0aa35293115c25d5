"""`python jobs/bench.py --help`: thin entry point for the bench job (logic lives in lesionseg)."""

import sys

from lesionseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]], prog="jobs/bench.py"))
