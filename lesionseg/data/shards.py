"""Pack ISIC cases into WebDataset tar shards with a manifest: find the cases, encode them
(lesionseg.data.encode), write the shards and the manifest under the output folder's lock.

The format and its reader: lesionseg.data.shard_format (and shards/README.md); verifying a
packed folder: lesionseg.data.verify.

Determinism: cases are ordered by (split, id) and written by the main process, tar headers
are fixed (mtime 0, uid/gid 0, fixed names and mode), and worker processes only encode, so
the same input gives byte-identical shards whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lesionseg import __version__
from lesionseg.config import Config, PackConfig, validate
from lesionseg.data.encode import assign_split, encode_case, encoded, is_val, stored_size
from lesionseg.data.isic import (
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
from lesionseg.data.verify import verify
from lesionseg.errors import UserError
from lesionseg.files import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

TAR_BLOCK = 512


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


def check_split_sizes(counts: Counter, cfg: PackConfig) -> None:
    """Refuse a pack whose train or val split would be empty (training needs both: a 12-case
    pack drew 0 val cases at val_fraction 0.1, and training stopped with "no val samples"),
    saying what to change; an empty val by choice (val_fraction 0) is a warning."""
    training = counts["train"] + counts["val"]
    if training and not counts["train"]:
        raise UserError(f"pack: all {training} training cases fell to val at "
                        f"--val-fraction {cfg.val_fraction}; lower it so train keeps cases")
    if training and not counts["val"]:
        if cfg.val_fraction > 0:
            raise UserError(
                f"pack: 0 of {training} training cases fell to val at --val-fraction "
                f"{cfg.val_fraction} (a hash of seed and id draws them); training needs val "
                f"cases: raise --val-fraction (e.g. {min(0.5, max(0.2, 2 / training)):.2f}) or "
                "change --seed")
        log.warning("pack: --val-fraction 0 leaves val empty; training needs val cases "
                    "(cross-validation, data.folds=K, draws its own from train)")


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
    check_split_sizes(Counter(t[1] for t in tasks), cfg)
    _prepare_out(out)
    writers = {s: ShardWriter(out, s, cfg.shard_max_samples, cfg.shard_max_bytes) for s in SPLITS}
    late: list[Problem] = []
    source_bytes = 0
    results = encoded(tasks, cfg.workers)
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




# Packing lives here; encoding (lesionseg.data.encode), verifying (lesionseg.data.verify) and
# the readers (lesionseg.data.shard_format) are re-exported under their old names, which
# shards/README.md once documented.
__all__ = [
    "MANIFEST", "SPLITS", "Sample", "ShardWriter", "assign_split", "build_manifest",
    "decode_sample", "encode_case", "is_val", "iter_raw", "iter_samples", "listed_samples",
    "pack", "read_manifest", "split_urls", "stored_size", "summary", "verify",
]
