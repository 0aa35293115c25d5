"""`python jobs/pack.py --help`: thin entry point for the pack job (logic lives in lesionseg)."""

import sys

from lesionseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]], prog="jobs/pack.py"))
