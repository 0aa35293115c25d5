"""`python jobs/train.py --help`: thin entry point for the train job (logic lives in lesionseg)."""

import sys

from lesionseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], prog="jobs/train.py"))
