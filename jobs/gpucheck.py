"""`python jobs/gpucheck.py --help`: thin entry point for the GPU checks (logic lives in lesionseg)."""

import sys

from lesionseg.gpucheck import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="jobs/gpucheck.py"))
