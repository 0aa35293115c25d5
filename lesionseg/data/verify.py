"""Verifying a packed folder against its manifest: every shard present, of the listed size,
hash and sample count, the split counts consistent, no unlisted shard; optionally every sample
decoded (`lesionseg verify --decode`)."""

from __future__ import annotations

from pathlib import Path

from lesionseg.data.shard_format import (
    MANIFEST,
    SHARD_RE,
    SPLITS,
    decode_sample,
    iter_raw,
    read_manifest,
    split_urls,
)
from lesionseg.errors import DataError, UserError
from lesionseg.files import sha256_file


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
