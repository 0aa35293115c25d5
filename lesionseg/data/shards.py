"""Pack ISIC cases into WebDataset tar shards with a manifest, verify them, and read them back.

Format (see shards/README.md): `<out>/{train,val,test}-NNNNNN.tar`, one sample per case with
`<id>.jpg` (image, longest side <= max_side), `<id>.png` (mask, mode L, 0/255, the stored
image's size) and `<id>.json` ({"id", "orig_size": [h, w], "split", "source"});
`manifest.json` lists every shard with its samples, bytes and sha256.

Determinism: cases are ordered by (split, id) and written by the main process, tar headers
are fixed (mtime 0, uid/gid 0, fixed names and mode), and worker processes only encode, so
the same input gives byte-identical shards whatever the number of workers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from lesionseg import __version__
from lesionseg.config import Config, PackConfig, load_config, save_config, validate
from lesionseg.data.cv import cv2
from lesionseg.data.images import (
    ImageError,
    display_size,
    encode_jpeg,
    encode_png,
    load_image,
    load_mask,
    peek_size,
)
from lesionseg.data.isic import (
    Case,
    DataError,
    Problem,
    find_cases,
    raise_problems,
    report_problems,
)
from lesionseg.errors import EXIT_FAILED, EXIT_OK, UserError
from lesionseg.files import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT = "lesionseg-wds"
FORMAT_VERSION = 1
SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar$")
TAR_BLOCK = 512


class Sample(NamedTuple):
    """One decoded shard sample."""

    id: str
    image: Image.Image  # RGB
    mask: Image.Image  # L, values 0/255, the image's size
    meta: dict[str, Any]  # {"id", "orig_size": [h, w], "split", "source"}


# ----------------------------------------------------------------------------- split, sizes


def is_val(case_id: str, seed: int, fraction: float) -> bool:
    """Whether a training case goes to val: a hash of (seed, id), so the choice is the same
    on every machine, rerun and worker count, and adding cases never moves old ones."""
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def assign_split(case: Case, cfg: PackConfig) -> str:
    """train/val/test of a case: the official test set stays test."""
    if case.split == "test":
        return "test"
    return "val" if is_val(case.id, cfg.split_seed, cfg.val_fraction) else "train"


def stored_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) an image is stored at: downscaled (never up) to max_side; 0 = as is."""
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


# ----------------------------------------------------------------------------- encoding (workers)


def _probe(raw: bytes, max_side: int) -> tuple[tuple[int, int], tuple[int, int], bool] | None:
    """Header only: (display size, stored size, original bytes can be kept), or None when
    Pillow cannot open it (the image loader then names the problem). Original JPEG bytes are
    kept when they need no change: RGB, no EXIF rotation, no downscaling."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            orig = display_size(img)
            target = stored_size(*orig, max_side)
            orientation = img.getexif().get(0x0112, 1) if img.format == "JPEG" else None
            keep = (img.format == "JPEG" and img.mode == "RGB" and orientation in (1, None)
                    and target == orig)
            return orig, target, keep
    except Exception:  # any header failure is reported by load_image with the file's name
        return None


def encode_case(case: Case, split: str, cfg: PackConfig) -> tuple[dict[str, bytes], int]:
    """Read, check and encode one case into its shard entries; returns (entries, source bytes).

    Raises ImageError/DataError naming the files when the case is unusable."""
    if case.mask is None:
        raise DataError(f"{case.image}: image without mask")
    raw_image, raw_mask = case.image.read_bytes(), case.mask.read_bytes()
    name = str(case.image)
    probe = _probe(raw_image, cfg.max_side)
    if probe is None:
        load_image(raw_image, name)  # raises the precise error
        raise ImageError(f"{name}: cannot be read as an image")
    orig, target, keep = probe
    if keep:
        image, size = load_image(raw_image, name)  # full decode: truncation is caught here
        jpg = raw_image
    else:
        image, size = load_image(raw_image, name, min_size=min(target) if target != orig else None)
        if image.size != (target[1], target[0]):
            # Area averaging, the reduction training and inference apply too (transforms._sample):
            # a sharper filter (Lanczos) stored images with ~20% more fine detail than the
            # model ever sees at inference, where originals are area-reduced to its input.
            image = Image.fromarray(cv2.resize(np.asarray(image), (target[1], target[0]),
                                               interpolation=cv2.INTER_AREA))
        jpg = encode_jpeg(image, cfg.jpeg_quality)
    try:
        mask = load_mask(raw_mask, str(case.mask), expected_size=size)
    except ImageError as e:
        raise ImageError(f"{e} (case {case.id}, image {name})") from None
    if mask.size != (target[1], target[0]):
        mask = mask.resize((target[1], target[0]), Image.NEAREST)
    meta = {"id": case.id, "orig_size": [size[0], size[1]], "split": split, "source": name}
    entries = {
        "jpg": jpg,
        "png": encode_png(mask),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return entries, len(raw_image) + len(raw_mask)


def _encode_task(task: tuple[Case, str, PackConfig]) -> tuple[Case, str, Any]:
    """Worker entry: ('ok', (entries, source bytes)) or ('error', Problem) — never raises for
    bad input, so one bad case cannot take down the pool."""
    case, split, cfg = task
    try:
        return case, "ok", encode_case(case, split, cfg)
    except UserError as e:
        files = (str(case.image),) + ((str(case.mask),) if case.mask else ())
        return case, "error", Problem(case.id, files, str(e))


def _encoded(tasks: list[tuple[Case, str, PackConfig]], workers: int) -> Iterator[tuple[Case, str, Any]]:
    """Encode tasks in order: in this process for one worker, else in a process pool.

    Fork where the platform has it: unlike spawn it does not re-run the caller's main module,
    so scripts and notebooks without an `if __name__ == "__main__"` guard work too. Workers
    only use Pillow and numpy, never torch, so forking a parent holding torch threads is safe."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_encode_task, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(_encode_task, tasks, chunksize=1)


# ----------------------------------------------------------------------------- tar writing


def _tar_size(entries: dict[str, bytes]) -> int:
    """Bytes the entries take in a tar: a header block each plus data padded to 512."""
    return sum(TAR_BLOCK + math.ceil(len(d) / TAR_BLOCK) * TAR_BLOCK for d in entries.values())


class ShardWriter:
    """Writes one split's samples into `<split>-NNNNNN.tar` files bounded by samples and
    bytes, with fixed tar headers (byte-identical output for identical input)."""

    def __init__(self, out: Path, split: str, max_samples: int, max_bytes: int):
        self.out, self.split = out, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._file: io.BufferedWriter | None = None
        self._samples = 0

    def _path(self, index: int) -> Path:
        return self.out / f"{self.split}-{index:06d}.tar"

    def _open(self) -> None:
        final = self._path(len(self.shards))
        self._file = open(final.with_name(f".{final.name}.partial"), "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115
        self._samples = 0

    def add(self, key: str, entries: dict[str, bytes]) -> None:
        """Append one sample, starting a new shard first when this one is full."""
        if self._tar is not None and (self._samples >= self.max_samples or
                                      self._file.tell() + _tar_size(entries) + 2 * TAR_BLOCK
                                      > self.max_bytes):
            self.close()
        if self._tar is None:
            self._open()
        for ext, data in entries.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = "lesionseg"
            self._tar.addfile(info, io.BytesIO(data))
        self._samples += 1

    def close(self) -> None:
        """Finish the current shard: close, fsync, rename into place, record its hash."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._path(len(self.shards))
        os.replace(final.with_name(f".{final.name}.partial"), final)
        self.shards.append({"name": final.name, "split": self.split, "samples": self._samples,
                            "bytes": final.stat().st_size, "sha256": sha256_file(final)})
        self._tar = self._file = None

    def abort(self) -> None:
        """Drop the shard being written (on error). Never raises: on a full disk closing the
        file fails again (its buffer cannot be flushed), and the partial file must still go."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            final = self._path(len(self.shards))
            with contextlib.suppress(OSError):
                final.with_name(f".{final.name}.partial").unlink(missing_ok=True)
        self._tar = self._file = None


# ----------------------------------------------------------------------------- pack


def _prepare_out(out: Path) -> None:
    """Create the folder and remove its manifest first: until this pack finishes, the folder
    is not a valid shard set (a run that dies leaves no manifest)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for leftover in out.glob(".*.tar.partial"):
        leftover.unlink()


def _remove_stale(out: Path, keep: set[str]) -> list[str]:
    """Delete shards of an earlier pack that this one did not write."""
    stale = sorted(p.name for p in out.iterdir() if SHARD_RE.match(p.name) and p.name not in keep)
    for name in stale:
        (out / name).unlink()
    return stale


def _options(cfg: PackConfig) -> dict[str, Any]:
    """Options that shape the output (worker count does not, so it is left out)."""
    options = asdict(cfg)
    options.pop("workers", None)
    return options


def build_manifest(shards: list[dict[str, Any]], cfg: PackConfig, sources: list[str],
                   skipped: list[Problem], source_bytes: int) -> dict[str, Any]:
    """The manifest: format, version, options, sources, splits with counts, shards, skips."""
    splits = {s: {"count": sum(x["samples"] for x in shards if x["split"] == s),
                  "shards": [x["name"] for x in shards if x["split"] == s]} for s in SPLITS}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lesionseg_version": __version__,
        "options": _options(cfg),
        "sources": sources,
        "splits": splits,
        "shards": shards,
        "total_samples": sum(x["samples"] for x in shards),
        "total_bytes": sum(x["bytes"] for x in shards),
        "source_bytes": source_bytes,
        "skipped": [{"id": p.id, "files": list(p.files), "reason": p.reason} for p in skipped],
    }


LOCK_FILE = ".pack.lock"  # in the output folder: held (flock) by the pack writing there


@contextlib.contextmanager
def _pack_lock(out: Path) -> Iterator[None]:
    """Hold the output folder's pack lock: a second pack into the same folder would delete
    this one's partial shards and mix the two. The lock goes with the process (flock), so a
    killed pack never leaves a stale one."""
    if out.exists() and not out.is_dir():
        yield  # _prepare_out names the problem
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out}: another pack is writing into this folder; wait for it to "
                            "finish, or use another --out") from None
        try:
            yield
        except BaseException:
            if created:  # a pack that failed before writing anything leaves no folder
                (out / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def pack(sources: list[str | Path], out: str | Path, cfg: PackConfig,
         progress: bool = True) -> dict[str, Any]:
    """Pack ISIC cases from `sources` into shards under `out`; returns the manifest.

    Bad cases stop the run (cfg.on_error="raise") or are left out and reported ("skip").
    manifest.json is written last and atomically. One pack at a time per folder (a lock)."""
    with _pack_lock(Path(out)):
        return _pack(sources, out, cfg, progress)


def _pack(sources: list[str | Path], out: str | Path, cfg: PackConfig,
          progress: bool) -> dict[str, Any]:
    validate(Config(pack=cfg))
    start = time.perf_counter()
    out = Path(out)
    skipped: list[Problem] = []
    cases = find_cases(sources, on_error=cfg.on_error, problems=skipped)
    tasks = sorted(((c, assign_split(c, cfg), cfg) for c in cases),
                   key=lambda t: (SPLITS.index(t[1]), t[0].id))
    _prepare_out(out)
    writers = {s: ShardWriter(out, s, cfg.shard_max_samples, cfg.shard_max_bytes) for s in SPLITS}
    late: list[Problem] = []
    source_bytes = 0
    results = _encoded(tasks, cfg.workers)
    try:
        for case, status, value in tqdm(results, total=len(tasks), desc="pack", unit="case",
                                        disable=not progress):
            if status == "error":
                if cfg.on_error == "raise":
                    raise_problems([value])
                late.append(value)
                continue
            entries, nbytes = value
            source_bytes += nbytes
            writers[assign_split(case, cfg)].add(case.id, entries)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        results.close()  # stops the worker pool now, not when the traceback is freed
    report_problems(late)
    skipped.extend(late)
    shards = [s for w in writers.values() for s in w.shards]
    if not shards:
        raise DataError(f"{', '.join(map(str, sources))}: every case was bad; nothing packed")
    stale = _remove_stale(out, {s["name"] for s in shards})
    if stale:
        log.info("removed %d stale shard(s) of an earlier pack in %s", len(stale), out)
    manifest = build_manifest(shards, cfg, [str(s) for s in sources], skipped, source_bytes)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    manifest["seconds"] = time.perf_counter() - start
    return manifest


def summary(manifest: dict[str, Any], out: Path, workers: int) -> str:
    """One paragraph: counts per split, shards, bytes, throughput, skips."""
    splits = manifest["splits"]
    counts = ", ".join(f"{s} {splits[s]['count']}" for s in SPLITS)
    seconds = manifest.get("seconds", 0.0)
    n = manifest["total_samples"]
    ratio = manifest["total_bytes"] / manifest["source_bytes"] if manifest["source_bytes"] else 0
    return (f"packed {n} cases ({counts}) into {len(manifest['shards'])} shards in {out}: "
            f"{manifest['total_bytes'] / 1e6:.1f} MB of shards from {manifest['source_bytes'] / 1e6:.1f} MB "
            f"of sources ({ratio:.2f}x); {seconds:.1f} s, {n / max(seconds, 1e-9):.1f} cases/s "
            f"with {workers} worker(s); {len(manifest['skipped'])} case(s) skipped. "
            f"Manifest: {out / MANIFEST}")


# ----------------------------------------------------------------------------- readers


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a packed folder; UserError naming the folder if missing or invalid."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST} (not a packed shard folder, or its pack did "
                        "not finish; run jobs/pack.py)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT
          and isinstance(manifest.get("shards"), list) and isinstance(manifest.get("splits"), dict)
          and all(isinstance(manifest["splits"].get(s), dict) for s in SPLITS))
    if not ok:
        raise UserError(f"{path}: not a lesionseg shard manifest (expected format {FORMAT!r} "
                        "with shards and splits)")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path}: format version {manifest['format_version']} is newer than this "
                        f"lesionseg ({__version__}) understands; upgrade lesionseg")
    return manifest


def split_urls(folder: str | Path, split: str) -> list[str]:
    """Absolute paths of a split's shards, in order (empty when the split has no case)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    manifest = read_manifest(folder)
    root = Path(folder).resolve()
    return [str(root / name) for name in manifest["splits"][split]["shards"]]


@functools.lru_cache(maxsize=16)
def _listed_samples(folder: str) -> dict[str, int]:
    try:
        shards = read_manifest(folder)["shards"]
    except UserError:
        return {}
    return {e["name"]: int(e["samples"]) for e in shards
            if isinstance(e, dict) and "name" in e and "samples" in e}


def listed_samples(url: str) -> int | None:
    """How many samples the manifest beside a shard says it holds (None: not listed there).
    A reader compares it with what it read: tarfile ends a tar silently at a damaged header."""
    path = Path(url)
    return _listed_samples(str(path.parent)).get(path.name)


def _entry(sample: dict[str, Any], exts: tuple[str, ...], where: str) -> bytes:
    for ext in exts:
        for key in (ext, f".{ext}"):
            if key in sample:
                return sample[key]
    raise DataError(f"{where}: sample has no .{exts[0]} entry (has {sorted(sample)})")


def decode_sample(sample: dict[str, Any], min_size: int | None = None,
                  draft_size: tuple[int, int] | None = None) -> Sample:
    """Decode a raw WebDataset sample (`__key__`, `jpg`, `png`, `json` bytes) to a Sample.

    With `min_size` the JPEG is decoded at a reduced DCT scale whose shorter side still holds
    min_size pixels (much faster when the consumer resizes down) and the mask is resized to
    the decoded image's size with nearest neighbour, so the two stay aligned. With
    `draft_size` (width, height) the JPEG is decoded at the smallest DCT scale at least that
    large and the mask is left at the stored size (for `apply_augmentation`, which maps both
    from the stored size's coordinates)."""
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', 'shard')}:{key}"
    try:
        meta = json.loads(_entry(sample, ("json",), where))
    except ValueError as e:
        raise DataError(f"{where}.json: not valid JSON ({e})") from None
    image, size = load_image(_entry(sample, ("jpg", "jpeg"), where), f"{where}.jpg",
                             min_size=min_size, draft_size=draft_size)
    mask = load_mask(_entry(sample, ("png",), where), f"{where}.png", expected_size=size)
    if draft_size is None and mask.size != image.size:
        mask = mask.resize(image.size, Image.NEAREST)
    return Sample(str(meta.get("id", key)), image, mask, meta)


def raw_image_size(sample: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of a raw sample's stored image, read from its header alone."""
    where = f"{sample.get('__url__', 'shard')}:{sample.get('__key__', '?')}"
    return peek_size(_entry(sample, ("jpg", "jpeg"), where), f"{where}.jpg")


def _key_ext(name: str) -> tuple[str, str]:
    """WebDataset's grouping: key = path up to the first '.' of the base name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def iter_raw(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__`, `__url__`, ext -> bytes) from tar shards, in order."""
    for url in urls:
        try:
            with tarfile.open(url, "r") as tar:
                current: dict[str, Any] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _key_ext(member.name)
                    if current and current["__key__"] != key:
                        yield current
                        current = {}
                    if not current:
                        current = {"__key__": key, "__url__": url}
                    current[ext] = tar.extractfile(member).read()
                if current:
                    yield current
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f"{url}: cannot be read as a tar shard ({e})") from None


def shard_keys(urls: Iterable[str]) -> list[str]:
    """The sample keys of tar shards, in order, from their headers alone (no member is read)."""
    keys: list[str] = []
    for url in urls:
        try:
            with tarfile.open(url, "r") as tar:
                for member in tar:
                    key = _key_ext(member.name)[0]
                    if member.isfile() and (not keys or keys[-1] != key):
                        keys.append(key)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f"{url}: cannot be read as a tar shard ({e})") from None
    return keys


def iter_samples(folder: str | Path, split: str, min_size: int | None = None) -> Iterator[Sample]:
    """Every sample of a split, decoded, in shard order (plain sequential reader)."""
    for raw in iter_raw(split_urls(folder, split)):
        yield decode_sample(raw, min_size=min_size)


# ----------------------------------------------------------------------------- verify


def verify(folder: str | Path, decode: bool = False) -> list[str]:
    """Everything wrong with a packed folder compared to its manifest (empty = all good):
    missing, resized or altered shards, wrong sample counts, unlisted shards; with `decode`
    also every sample's image/mask."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems: list[str] = []
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (file altered or corrupt)")
        try:
            keys = [raw["__key__"] for raw in iter_raw([str(path)])]
        except DataError as e:
            problems.append(str(e))
            continue
        if len(keys) != entry["samples"]:
            problems.append(f"{path}: {len(keys)} samples, manifest says {entry['samples']}")
    for split in SPLITS:
        listed = [s for s in manifest["shards"] if s["split"] == split]
        count = manifest["splits"][split]["count"]
        if sum(s["samples"] for s in listed) != count:
            problems.append(f"{folder / MANIFEST}: split {split} counts {count} but its shards "
                            f"hold {sum(s['samples'] for s in listed)}")
    listed_names = {s["name"] for s in manifest["shards"]}
    for path in sorted(folder.iterdir()):
        if SHARD_RE.match(path.name) and path.name not in listed_names:
            problems.append(f"{path}: shard not listed in the manifest (left from another pack?)")
    if decode and not problems:
        problems.extend(_verify_decode(folder))
    return problems


def _verify_decode(folder: Path) -> list[str]:
    """Decode every sample: image readable, mask binary and the image's size, ids unique."""
    problems, seen = [], set()
    for split in SPLITS:
        for raw in iter_raw(split_urls(folder, split)):
            try:
                sample = decode_sample(raw)
            except UserError as e:
                problems.append(str(e))
                continue
            if sample.id in seen:
                problems.append(f"{raw['__url__']}: id {sample.id} appears more than once")
            seen.add(sample.id)
    return problems


# ----------------------------------------------------------------------------- commands


def add_pack_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lesionseg pack` / jobs/pack.py; option defaults come from the config."""
    d = PackConfig()
    parser.description = (
        "Pack ISIC 2016 Part 1 data into WebDataset shards: train/val/test tar files plus "
        "manifest.json (written last). Training cases are split into train/val by a hash of "
        "(seed, id); the official test set stays test. Precedence: defaults < --config file < "
        "key=value overrides < the options below.")
    parser.add_argument("--source", action="append", required=True, metavar="PATH",
                        help="an ISIC root folder, an official zip (e.g. "
                             "ISBI2016_ISIC_Part1_Training_Data.zip), or an image or mask folder; "
                             "repeat for several. Prefix test= to treat a plain folder as test data")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder, e.g. shards/isic2016 (old shards there are replaced)")
    parser.add_argument("--val-fraction", type=float,
                        help=f"fraction of training cases held out as val (default {d.val_fraction})")
    parser.add_argument("--seed", type=int, help=f"seed of the train/val split (default {d.split_seed})")
    parser.add_argument("--max-side", type=int,
                        help=f"store images with at most this longest side; 0 keeps the original "
                             f"JPEG bytes where possible (default {d.max_side})")
    parser.add_argument("--jpeg-quality", type=int,
                        help=f"quality of re-encoded JPEGs (default {d.jpeg_quality})")
    parser.add_argument("--shard-max-samples", type=int,
                        help=f"at most this many samples per shard (default {d.shard_max_samples})")
    parser.add_argument("--shard-max-bytes", type=int,
                        help=f"at most about this many bytes per shard (default {d.shard_max_bytes})")
    parser.add_argument("--workers", type=int,
                        help=f"encoding worker processes (default {d.workers})")
    parser.add_argument("--on-error", choices=("raise", "skip"),
                        help="bad case: stop naming the files (raise, default) or leave it out "
                             "and print a report (skip)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--config", metavar="FILE", help="YAML config file (its pack: section)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. pack.shard_max_samples=200")


_FLAG_KEYS = {"val_fraction": "val_fraction", "seed": "split_seed", "max_side": "max_side",
              "jpeg_quality": "jpeg_quality", "shard_max_samples": "shard_max_samples",
              "shard_max_bytes": "shard_max_bytes", "workers": "workers", "on_error": "on_error"}


def pack_config_from_args(args: argparse.Namespace) -> Config:
    """Defaults <- --config <- key=value <- explicit flags, validated (ConfigError names the key)."""
    overrides = list(args.overrides or [])
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"pack.{key}={value}")
    return load_config(args.config, overrides)


def pack_command(args: argparse.Namespace) -> int:
    """Run the pack job and print its summary."""
    cfg = pack_config_from_args(args)
    out = Path(args.out)
    manifest = pack(args.source, out, cfg.pack, progress=not args.no_progress)
    save_config(cfg, out / "config.yaml")
    print(summary(manifest, out, cfg.pack.workers))
    return EXIT_OK


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lesionseg verify`."""
    parser.description = (
        "Check a packed shard folder against its manifest.json: every shard present with its "
        "size, sha256 and sample count, split counts consistent, no unlisted shards. Exit 1 and "
        "name each problem if anything is wrong.")
    parser.add_argument("folder", metavar="FOLDER", help="packed folder, e.g. shards/isic2016")
    parser.add_argument("--decode", action="store_true",
                        help="also decode every sample (image readable, mask binary and aligned)")


def verify_command(args: argparse.Namespace) -> int:
    """Run verify: print problems (one a line) or a one-line OK."""
    problems = verify(args.folder, decode=args.decode)
    manifest = read_manifest(args.folder)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"{args.folder}: {len(problems)} problem(s)")
        return EXIT_FAILED
    counts = ", ".join(f"{s} {manifest['splits'][s]['count']}" for s in SPLITS)
    print(f"OK {args.folder}: {len(manifest['shards'])} shards, {manifest['total_samples']} "
          f"samples ({counts}) match the manifest")
    return EXIT_OK


__all__ = [
    "Sample", "ShardWriter", "add_pack_arguments", "add_verify_arguments",
    "assign_split", "decode_sample", "encode_case", "is_val", "iter_raw", "iter_samples",
    "listed_samples", "pack",
    "pack_command", "read_manifest", "split_urls", "stored_size", "verify", "verify_command",
]
