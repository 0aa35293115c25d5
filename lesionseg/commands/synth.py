"""`lesionseg synth`: write synthetic ISIC-layout cases (lesionseg.data.synthetic)."""

from __future__ import annotations

import argparse
import time

from lesionseg.data.synthetic import FULL_SIZE, write_isic_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lesionseg synth`."""
    parser.description = (
        "Write synthetic dermoscopy-like cases (skin, irregular lesion, hairs, vignette) with "
        "their lesion masks, in the exact ISIC 2016 Part 1 layout, so every job can be tried "
        "without the real data. The same seed always gives the same files.")
    parser.add_argument("out", metavar="OUT", help="folder to write (created if missing)")
    parser.add_argument("--train", "--count", dest="train", type=int, default=20,
                        help="number of training cases (default: %(default)s)")
    parser.add_argument("--test", type=int, default=0,
                        help="number of official-test cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every case (default: %(default)s)")
    parser.add_argument("--min-side", type=int, default=64,
                        help="smallest longest side in pixels (default: %(default)s)")
    parser.add_argument("--max-side", type=int, default=FULL_SIZE[1],
                        help="largest longest side in pixels; ISIC full size is 4288 (default: %(default)s)")
    parser.add_argument("--zips", action="store_true",
                        help="write the four official zip files instead of the four folders")
    parser.add_argument("--hard", dest="difficulty", action="store_const", const="hard",
                        default="easy",
                        help="hard cases: faint lesions with soft borders, light to dark skin, "
                             "dense hair, freckles and satellite spots, rulers, ink, bubbles, "
                             "dark vignettes, lesions at the edge, some full-size images "
                             "(default: the easy cases of the demo)")


def command(args: argparse.Namespace) -> int:
    """Run `lesionseg synth`: write the data set and print where it is."""
    start = time.perf_counter()
    root = write_isic_dataset(args.out, args.train, args.test, seed=args.seed,
                              min_side=args.min_side, max_side=args.max_side, zips=args.zips,
                              progress=True, difficulty=args.difficulty)
    seconds = time.perf_counter() - start
    layout = "official zips" if args.zips else "official folders"
    print(f"wrote {args.train} training and {args.test} test cases ({args.difficulty}) to {root} ({layout}) "
          f"in {seconds:.1f} s")
    return 0
