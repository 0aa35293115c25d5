"""Pack ISIC cases into WebDataset tar shards with a manifest, and verify a packed folder.

The format and its reader: lesionseg.data.shard_format (and shards/README.md).

Determinism: cases are ordered by (split, id) and written by the main process, tar headers
are fixed (mtime 0, uid/gid 0, fixed names and mode), and worker processes only encode, so
the same input gives byte-identical shards whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from lesionseg import __version__
from lesionseg.config import Config, PackConfig, validate
from lesionseg.data.cv import cv2
from lesionseg.data.images import (
    ImageError,
    display_size,
    encode_jpeg,
    encode_png,
    load_image,
    load_mask,
)
from lesionseg.data.isic import (
    Case,
    DataError,
    Problem,
    find_cases,
    raise_problems,
    report_problems,
)
from lesionseg.data.shard_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_RE,
    SPLITS,
    Sample,
    decode_sample,
    iter_raw,
    iter_samples,
    listed_samples,
    read_manifest,
    split_urls,
)
from lesionseg.errors import UserError
from lesionseg.files import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

TAR_BLOCK = 512


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


# Packing and verifying live here; the readers (lesionseg.data.shard_format) are re-exported
# under their old names, which shards/README.md once documented.
__all__ = [
    "MANIFEST", "SPLITS", "Sample", "ShardWriter", "assign_split", "build_manifest",
    "decode_sample", "encode_case", "is_val", "iter_raw", "iter_samples", "listed_samples",
    "pack", "read_manifest", "split_urls", "stored_size", "summary", "verify",
]
