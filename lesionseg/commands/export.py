"""`lesionseg export`: export a checkpoint to ONNX or TorchScript, or verify an export
(lesionseg.export)."""

from __future__ import annotations

import argparse

from lesionseg.errors import EXIT_FAILED, EXIT_OK
from lesionseg.export import (
    FORMATS,
    INPUT_DTYPES,
    ExportError,
    ParityError,
    export_model,
    verify_file,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = """\
Export a checkpoint as one file for deployment: ONNX (ONNX Runtime, any language) or
TorchScript (torch without lesionseg). The file holds the BatchNorm-folded eval model with
its preprocessing inside: RGB N×3×H×W in (uint8 0-255 by default, or float 0-1 with
--input float; N, H, W dynamic, H and W at least 32, padded to a multiple of 32 inside),
probabilities N×H×W out. Its metadata carries the lesionseg version, the checkpoint's
sha256, the image size, the threshold and post-processing chosen on validation, the input
convention and the parity measured at export.

Before writing, the file is run against PyTorch fp32 on synthetic images of four sizes:
it is written only if max |Δprobability| ≤ 1e-4 and the masks agree on ≥ 99.99% of pixels
(fp16: ≤ 1e-2 and ≥ 99.9%); the figures are printed. MODEL_CARD.md is written beside it.
--verify FILE repeats the check on an existing file (exit 1 if it fails)."""
    parser.epilog = """examples:
  lesionseg export --checkpoint runs/demo/best.pt --format onnx --out runs/demo/best.onnx
  lesionseg export --checkpoint best.pt --format onnx --fp16 --out best-fp16.onnx
  lesionseg export --checkpoint best.pt --format torchscript --out best.ts
  lesionseg export --checkpoint best.pt --verify best.onnx
  python jobs/infer.py --checkpoint best.onnx --input images/ --out out/   # ONNX Runtime"""
    parser.add_argument("--checkpoint", metavar="FILE", required=True,
                        help="best.pt (or last.pt) from a training run")
    parser.add_argument("--format", choices=FORMATS, default="onnx",
                        help="onnx (default) or torchscript")
    parser.add_argument("--out", metavar="FILE", help="the file to write (e.g. best.onnx)")
    parser.add_argument("--input", choices=tuple(INPUT_DTYPES), default="uint8", dest="input_dtype",
                        help="input convention of an ONNX file: uint8 0-255 (default; what "
                             "images decode to) or float 0-1. TorchScript files take both")
    parser.add_argument("--fp16", action="store_true",
                        help="ONNX with fp16 weights and activations (half the size); input and "
                             "output stay as with fp32. Written only within the fp16 limits "
                             "(demo model: max |Δp| 2.5e-3 at 128 px, 8.5e-3 at 384 px, masks "
                             "equal on 99.995%%; slower than fp32 on a CPU, see the README)")
    parser.add_argument("--verify", metavar="FILE",
                        help="instead of exporting: check an existing exported FILE against "
                             "--checkpoint and print the parity figures")
    parser.add_argument("--no-card", action="store_true",
                        help="do not write MODEL_CARD.md beside the exported file")


def command(args: argparse.Namespace) -> int:
    if args.verify:
        parity = verify_file(args.verify, args.checkpoint)
        print(f"{args.verify}: parity against {args.checkpoint}")
        print("\n".join(parity.lines()))
        return EXIT_OK if parity.passed else EXIT_FAILED
    if not args.out:
        raise ExportError("missing --out FILE (or --verify FILE)")
    try:
        result = export_model(args.checkpoint, args.out, args.format, args.input_dtype,
                              args.fp16, write_card=not args.no_card)
    except ParityError as e:  # the table is the command's output; nothing was written
        print(str(e))
        return EXIT_FAILED
    print(f"{result.path}: {result.metadata['file_format']} {result.metadata['precision']}, "
          f"{result.bytes / 1e6:.1f} MB, exported and checked in {result.seconds:.1f} s")
    print("\n".join(result.parity.lines()))
    return EXIT_OK
