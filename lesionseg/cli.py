"""The `lesionseg` command: one subcommand per job. `jobs/*.py` call `main` with their name.

Each job's module exposes `add_arguments(parser)` and `command(args) -> int`; modules are
imported only when their subcommand runs, so `lesionseg --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lesionseg import __version__
from lesionseg.errors import (
    EXIT_FAILED,
    EXIT_RESUME,
    EXIT_USAGE,
    RankError,
    Stopped,
    UserError,
    environment_message,
    is_environmental,
    restore_handlers,
    stop_during_startup,
)

# name -> (module, add_arguments function, command function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "synth": ("lesionseg.commands.synth", "add_arguments", "command",
              "write synthetic dermoscopy-like cases in the ISIC 2016 layout (folders or zips)"),
    "pack": ("lesionseg.commands.pack", "add_pack_arguments", "pack_command",
             "pack ISIC 2016 folders or official zips into WebDataset shards + manifest.json"),
    "verify": ("lesionseg.commands.pack", "add_verify_arguments", "verify_command",
               "check a packed shard folder's counts and sha256 against its manifest"),
    "train": ("lesionseg.commands.train", "add_arguments", "command",
              "train the MobileNetV2 encoder-decoder (use `accelerate launch` for several processes)"),
    "cv": ("lesionseg.commands.cv", "add_arguments", "command",
           "evaluate a cross-validation run (data.folds=K): out-of-fold scores, pooled choice"),
    "infer": ("lesionseg.commands.infer", "add_arguments", "command",
              "batch inference: masks, per-image Dice/IoU, summary and report for folders/archives"),
    "export": ("lesionseg.commands.export", "add_arguments", "command",
               "export a checkpoint to ONNX or TorchScript (preprocessing inside), parity-checked"),
    "bench": ("lesionseg.commands.bench", "add_arguments", "command",
              "benchmarks: data pipeline, training step and inference, side by side"),
}

EPILOG = """examples:
  lesionseg synth data/synthetic --count 50
  lesionseg pack --source ISIC2016/ --out shards/isic2016
  accelerate launch jobs/train.py data.shards=shards/isic2016 optim.epochs=30
  lesionseg infer --checkpoint runs/demo/best.pt --input images/ --out out/
  python jobs/train.py data.shards=shards/isic2016 data.folds=5 train.output_dir=runs/cv5
  lesionseg cv runs/cv5 && lesionseg infer --checkpoint runs/cv5 --input test/ --out out/cv5
  lesionseg export --checkpoint runs/demo/best.pt --format onnx --out runs/demo/best.onnx
run `lesionseg COMMAND --help` for a command's options."""


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lesionseg",
        description="Skin-lesion segmentation on ISIC 2016: pack, train, infer, export, bench.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"lesionseg {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (*_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return p


def build_parser(name: str, prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    """The parser of one subcommand and the function that runs it."""
    module_name, add_name, run_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=prog or f"lesionseg {name}", description=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    getattr(module, add_name)(parser)
    return parser, getattr(module, run_name)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _say(prog: str, line: str, shared: bool) -> None:
    """Print a command's one-line outcome; one that every rank shares, on rank 0 only."""
    if not shared or os.environ.get("RANK", "0") == "0":
        print(f"{prog}: {line}", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        args = _top_parser().parse_args(argv)
        if args.command is None:
            _top_parser().print_help()
            return EXIT_USAGE
    name, rest = argv[0], argv[1:]
    # train: from now on, before the imports, a stop signal is a stop (75)
    previous = stop_during_startup() if name == "train" else {}
    try:
        return _run(name, rest, prog)
    finally:
        restore_handlers(previous)  # for callers of main in their own process


def _run(name: str, rest: list[str], prog: str | None) -> int:
    setup_logging()
    try:
        parser, run = build_parser(name, prog)
    except Stopped as e:  # while importing the command's modules
        _say(prog or f"lesionseg {name}", f"stopped: {e}", True)
        return EXIT_RESUME
    # Intermixed: `key=value` overrides may stand between or before the flags.
    args = parser.parse_intermixed_args(rest)
    try:
        return int(run(args) or 0)
    except UserError as e:
        _say(parser.prog, f"error: {e}", e.shared)
        return EXIT_USAGE
    except RankError as e:
        _say(parser.prog, f"error: {e}", e.shared)
        return EXIT_FAILED
    except Stopped as e:
        _say(parser.prog, f"stopped: {e}", True)
        return EXIT_RESUME
    except OSError as e:  # disk full, read-only, I/O: the machine, not a bug; one line
        if not is_environmental(e):
            raise
        print(f"{parser.prog}: error: {environment_message(e, 'writing')}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
