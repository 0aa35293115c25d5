"""`jobs/gpucheck.py`: its options, the run, and one-line errors with exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesionseg.cli import setup_logging
from lesionseg.errors import EXIT_USAGE, UserError
from lesionseg.files import work_folder
from lesionseg.gpucheck.plan import GpuCheckError, plan_for
from lesionseg.gpucheck.run import run_checks
from lesionseg.gpucheck.table import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `jobs/gpucheck.py`."""
    parser.description = (
        "The prepared GPU checks in one time-boxed run: environment, training step (fp32, "
        "fp16, bf16,\nchannels_last, torch.compile), pinned-memory copies, the inference job "
        "vs a naive loop and the\nbare forward, the training job in fp16/bf16, DDP over NCCL "
        "with several GPUs. Prints a table\nand writes every figure to --out "
        "(docs/gpucheck.md explains them).")
    parser.add_argument("--out", default="gpu-check.json", metavar="FILE",
                        help="where to write the JSON results (default: gpu-check.json); "
                             "rewritten after every part")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and images: about 6 minutes on one H200")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default; exits 2 when no CUDA device is visible) or cpu "
                             "(the same code at tiny sizes, CUDA-only parts skipped)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="time for the whole run; parts get at most what is left "
                             "(default: 1200, --quick 420, cpu 300)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where data, checkpoints and run folders go; kept (default: a "
                             "temporary folder, deleted at the end)")


def command(args: argparse.Namespace) -> int:
    """Run every part, print the table, write --out; returns 0 once the JSON is written (the
    parts' failures are in it, and listed under failed_parts)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise GpuCheckError("no CUDA device is visible here; run it on a GPU host, or pass "
                            "--device cpu for the CPU code paths at tiny sizes")
    if args.budget is not None and args.budget <= 0:
        raise GpuCheckError(f"--budget must be > 0 seconds, got {args.budget}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise GpuCheckError(f"--out {out}: folder {out.parent} does not exist")
    plan = plan_for(args.device, args.quick, args.budget)
    with work_folder(args.workdir, "lesionseg-gpucheck-") as workdir:
        doc = run_checks(plan, workdir, out, quick=args.quick)
    print(format_table(doc))
    print(f"\nresults written to {out}")
    return 0


def main(argv: list[str] | None = None, prog: str = "jobs/gpucheck.py") -> int:
    """`jobs/gpucheck.py`: parse, run, one-line errors with exit status 2."""

    parser = argparse.ArgumentParser(prog=prog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return command(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
