"""The shard format, and the one reader of it that training, verify, tuning and the benchmarks
share (inference lists the same tars by header offsets, lesionseg.data.sources, with the same
key rule).

Format (see shards/README.md): `<folder>/{train,val,test}-NNNNNN.tar`, one sample per case
with `<id>.jpg` (image, longest side <= pack.max_side), `<id>.png` (mask, mode L, 0/255, the
stored image's size) and `<id>.json` ({"id", "orig_size": [h, w], "split", "source"});
`manifest.json` lists every shard with its samples, bytes and sha256 and is written last.
A member's key is its path up to the first '.' of its base name (WebDataset's rule,
`sample_key`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from webdataset import tariterators
from webdataset.gopen import gopen

from lesionseg import __version__
from lesionseg.data.images import load_image, load_mask, peek_size
from lesionseg.errors import DataError, UserError, first_line

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")  # the splits of a packed folder (val is drawn from train)
MANIFEST = "manifest.json"
FORMAT = "lesionseg-wds"
FORMAT_VERSION = 1
SHARD_RE = re.compile(r"^(train|val|test)-\d{6}\.tar$")


class Sample(NamedTuple):
    """One decoded shard sample."""

    id: str
    image: Image.Image  # RGB
    mask: Image.Image  # L, values 0/255, the image's size
    meta: dict[str, Any]  # {"id", "orig_size": [h, w], "split", "source"}



def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the key is the path up to the first '.' of the base
    name, the extension the rest (`a/ISIC_0000000.jpg` → (`a/ISIC_0000000`, `jpg`))."""
    folder, _, base = name.replace("\\", "/").rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


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



# ----------------------------------------------------------------------------- reading


def _member_key(name: str) -> tuple[str | None, str | None]:
    """`sample_key` as WebDataset's grouping takes it: members without a stem or an
    extension are no sample's part (None)."""
    key, ext = sample_key(name)
    stem = key.rpartition("/")[2]
    return (key, ext) if stem and ext else (None, None)


def raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """The one raw reader: the samples (`__key__`, `__url__`, ext → bytes) of one tar shard,
    streamed in order by WebDataset's tar reader with the format's key rule. Errors of the tar,
    OS or compression layers pass through (the callers word them)."""
    stream = gopen(url)
    try:
        yield from tariterators.group_by_keys(
            tariterators.tar_file_expander([{"url": url, "stream": stream}]), keys=_member_key)
    finally:
        stream.close()


def iter_raw(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Raw samples of tar shards, in order; an unreadable shard is a DataError naming it."""
    for url in urls:
        try:
            yield from raw_samples(url)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f"{url}: cannot be read as a tar shard ({first_line(e)})") from None


_WARNED_SHARDS: set[str] = set()


def read_shard(url: str, on_error: str,
               ids: frozenset[str] | None = None) -> Iterator[dict[str, Any]]:
    """`raw_samples` of one shard as training reads it: with `ids`, only the samples whose key
    is one of them (a fold's); the count checked against the manifest (tarfile ends a tar at a
    damaged header as if it were complete). A corrupt shard is a DataError naming it, or
    (on_error=skip) a warning and the end of that shard."""
    try:
        read = 0
        for sample in raw_samples(url):
            read += 1
            if ids is None or sample["__key__"] in ids:
                yield sample
        listed = listed_samples(url)
        if listed is not None and read != listed:  # tarfile stops silently at a bad header
            raise tarfile.ReadError(f"{read} of the {listed} samples its manifest lists could "
                                    "be read (a damaged tar header?)")
    except MemoryError:
        raise  # not the shard's fault (e.g. data.batch_size or data.shuffle_buffer too large)
    except Exception as e:  # tarfile, OS, zlib and webdataset errors come in many types
        msg = f"{url}: corrupt or unreadable shard ({type(e).__name__}: {first_line(e)})"
        if on_error != "skip":
            raise DataError(msg + "; repack it, or set data.on_error=skip") from None
        if url not in _WARNED_SHARDS:  # a lane may come back to it every cycle: warn once
            _WARNED_SHARDS.add(url)
            log.warning("%s; skipping the rest of this shard (every time it is read)", msg)


def _where(sample: dict[str, Any]) -> str:
    """`shard:key` of a raw sample, for its error messages."""
    return f"{sample.get('__url__', 'shard')}:{sample.get('__key__', '?')}"


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
    where = _where(sample)
    try:
        meta = json.loads(_entry(sample, ("json",), where))
    except ValueError as e:
        raise DataError(f"{where}.json: not valid JSON ({e})") from None
    image, size = load_image(_entry(sample, ("jpg", "jpeg"), where), f"{where}.jpg",
                             min_size=min_size, draft_size=draft_size)
    mask = load_mask(_entry(sample, ("png",), where), f"{where}.png", expected_size=size)
    if draft_size is None and mask.size != image.size:
        mask = mask.resize(image.size, Image.NEAREST)
    return Sample(str(meta.get("id", sample.get("__key__", "?"))), image, mask, meta)


def raw_mask(sample: dict[str, Any]) -> Image.Image:
    """A raw sample's mask alone (mode L, 0/255, the stored size)."""
    where = _where(sample)
    return load_mask(_entry(sample, ("png",), where), f"{where}.png")


def raw_image_size(sample: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of a raw sample's stored image, read from its header alone."""
    where = _where(sample)
    return peek_size(_entry(sample, ("jpg", "jpeg"), where), f"{where}.jpg")



def shard_keys(urls: Iterable[str]) -> list[str]:
    """The sample keys of tar shards, in order, from their headers alone (no member is read)."""
    keys: list[str] = []
    for url in urls:
        try:
            with tarfile.open(url, "r") as tar:
                for member in tar:
                    key = sample_key(member.name)[0]
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
