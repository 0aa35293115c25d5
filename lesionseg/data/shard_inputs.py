"""A packed shard folder as inference inputs: one item per sample of the splits asked for
(by default test, else val), its stored mask as truth, its original display size from its
json; the shards are listed (with the damage checks of `archive.list_tar`), never unpacked."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO

from lesionseg.data.archive import ArchiveError, Blob, base_name, list_tar, open_decompressed
from lesionseg.data.items import Found, Item, SourceError, sanitize_id
from lesionseg.data.shard_format import MANIFEST, SPLITS, read_manifest, sample_key, split_urls

log = logging.getLogger(__name__)


def shard_items(folder: Path, splits: tuple[str, ...], label: str
                ) -> tuple[list[str], list[Found], list[dict[str, str]], dict[str, int]]:
    """A packed shard folder: (splits read, one found item per sample, errors, samples left
    out by split). An item's image is the sample's `jpg`, its truth the `png`, its original
    display size from its `json` (images may be stored downscaled). Only the splits `splits`
    names; by default the test split, or val when there is none: scores over train (or train
    and val mixed) would be optimistic."""
    splits, tars, left_out = _shard_files(folder, splits)
    others = "; ".join(f"{n} {s} samples left out" for s, n in left_out.items())
    log.info("%s: scoring the %s split%s%s", folder, ", ".join(splits),
             "s" if len(splits) > 1 else "", f" only ({others}; --splits "
             f"{','.join(s for s in SPLITS if s in (*splits, *left_out))} scores every split)"
             if others else "")
    found: list[Found] = []
    errors: list[dict[str, str]] = []
    for split, tar_path, listed in tars:
        samples: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
        try:
            members, problem = list_tar(tar_path)
        except ArchiveError as e:
            raise SourceError(str(e)) from None
        for info in members:
            if not info.isreg():
                continue
            key, ext = sample_key(info.name)
            samples[key][ext.lower()] = info
        if problem or (listed is not None and len(samples) != listed):
            errors.append({"input": str(tar_path), "id": "", "reason": (
                f"shard holds {len(samples)} readable samples, {MANIFEST} lists "
                f"{listed}{f'; {problem}' if problem else ''} (check it with lesionseg "
                "verify; repack it)")})
        with open_decompressed(str(tar_path)) as stream:
            metas = {key: _read_meta(stream, parts.get("json")) for key, parts in samples.items()}
        for key, parts in sorted(samples.items()):
            sample = _sample_item(tar_path, key, parts, metas[key], split)
            if isinstance(sample, Item):
                found.append(Found(sample, label, sample.id, f"{os.path.abspath(tar_path)}:{key}"))
            else:
                errors.append(sample)
    return splits, found, errors, left_out


def _sample_item(tar_path: Path, key: str, parts: dict[str, tarfile.TarInfo], meta: dict,
                 split: str) -> Item | dict[str, str]:
    """A shard sample's item, or its error row when it has no image."""
    image = parts.get("jpg")
    sid = sanitize_id(str(meta.get("id") or base_name(key)))
    if image is None:
        return {"input": f"{tar_path}:{key}", "id": sid, "reason": "shard sample has no jpg image"}
    truth = parts.get("png")
    orig = meta.get("orig_size")
    orig_size = (int(orig[0]), int(orig[1])) if isinstance(orig, list) and len(orig) == 2 else None
    return Item(sid, _member_blob(tar_path, image), _member_blob(tar_path, truth) if truth else None,
                orig_size, truth_scaled=truth is not None, split=split)


def _member_blob(tar_path: Path, info: tarfile.TarInfo) -> Blob:
    return Blob("tar", str(tar_path), info.name, info.offset_data, info.size)


def _read_meta(stream: BinaryIO, info: tarfile.TarInfo | None) -> dict:
    """A shard sample's json (empty dict if missing or unreadable: orig_size is optional)."""
    if info is None:
        return {}
    try:
        stream.seek(info.offset_data)
        meta = json.loads(stream.read(info.size))
    except (OSError, ValueError, EOFError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _shard_files(folder: Path, splits: tuple[str, ...]
                 ) -> tuple[list[str], list[tuple[str, Path, int | None]], dict[str, int]]:
    """The splits read, their (split, shard tar, samples the manifest lists) triples and the
    samples of the other splits: `splits`, or by default test, else val (train alone is
    refused: it would score the training data)."""
    manifest = read_manifest(folder)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise SourceError(f"infer.splits: unknown split(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(SPLITS)}")
    available = [s for s in SPLITS if manifest["splits"][s].get("shards")]
    if splits:
        wanted = [s for s in available if s in splits]
        if not wanted:
            raise SourceError(f"{folder}: no shards of split(s) {', '.join(splits)} "
                              f"(the manifest has {', '.join(available) or 'none'})")
    else:
        wanted = [s for s in ("test", "val") if s in available][:1]
        if not wanted:
            raise SourceError(f"{folder}: no test or val shards to score (the manifest has "
                              f"{', '.join(available) or 'none'}); set infer.splits=[train] "
                              "to segment the training split")
    counts = {e.get("name"): e.get("samples") for e in manifest["shards"] if isinstance(e, dict)}
    left_out = {s: int(manifest["splits"][s].get("count") or 0) for s in available
                if s not in wanted}
    return wanted, [(split, Path(u), counts.get(Path(u).name))
                    for split in wanted for u in split_urls(folder, split)], left_out
