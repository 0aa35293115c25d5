"""`python jobs/infer.py --help`: thin entry point for the infer job (logic lives in lesionseg)."""

import sys

from lesionseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]], prog="jobs/infer.py"))
