"""Reading and decoding the inputs in DataLoader workers: the image at the eval size (and, for
the second pass, a finer copy of an image larger than that), its (optional) truth, a preview;
a failing item becomes an error, never an exception."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from lesionseg.data.images import (
    check_before_reading,
    load_image,
    load_mask,
    load_mask_oriented,
)
from lesionseg.data.sources import Item
from lesionseg.data.transforms import stack_images
from lesionseg.errors import UserError, environment_message, is_environmental
from lesionseg.infer.refine import Refine, decode_side, model_inputs

log = logging.getLogger(__name__)

class ItemDataset(Dataset):
    """Reads and decodes items in DataLoader workers. A failing item never raises: it comes
    back as {"error": reason} so that one bad file cannot stop the batch."""

    def __init__(self, items: list[Item], image_size: int, preview_side: int,
                 refine: Refine | None = None) -> None:
        self.items, self.image_size, self.preview_side = items, image_size, preview_side
        self.refine = refine

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            return {"index": index, **decode_item(item, self.image_size, self.preview_side,
                                                  self.refine)}
        except UserError as e:
            return {"index": index, "error": str(e)}
        except OSError as e:
            if is_environmental(e, reading=True):  # an I/O error: stop, retried on rerun
                return {"index": index, "error": environment_message(e, f"reading {item.origin}"),
                        "environmental": True}
            return {"index": index, "error": f"{item.origin}: {type(e).__name__}: {e}"}
        except Exception as e:  # any reader/decoder failure is this item's, not the batch's
            log.debug("decoding %s failed", item.origin, exc_info=True)
            return {"index": index, "error": f"{item.origin}: {type(e).__name__}: {e}"}


def decode_item(item: Item, image_size: int, preview_side: int,
                refine: Refine | None = None) -> dict[str, Any]:
    """Image → eval-transformed tensor; with `refine`, `fine`: the finer copy the second pass
    crops from (`fine_copy`; None for an image no larger than the eval size); truth → packed
    bits (1 = lesion) at the original size, row-major, h*w bits; preview → an RGB array of at
    most preview_side pixels a side."""
    check_before_reading(item.image)
    data = item.image.read()
    img, display = load_image(data, item.origin, min_size=decode_side(image_size, refine))
    size = item.orig_size or display
    x, fine = model_inputs(img, image_size, refine)
    out: dict[str, Any] = {"image": x, "fine": fine, "size": size,
                           "truth_bits": None, "truth_error": None, "truth_note": "",
                           "preview": None}
    if preview_side:  # img is not needed any more: shrink it in place (no copy)
        img.thumbnail((preview_side, preview_side), Image.BILINEAR)
        out["preview"] = np.asarray(img)
    if item.truth is not None:
        try:
            truth, note = read_truth(item, size, display)
            # load_mask gives exactly 0/255, so packbits' "nonzero" is the ISIC "> 128". Packed,
            # the truth crosses to the main process as 1/8 of the bytes (pickled, not shm).
            out["truth_bits"], out["truth_note"] = np.packbits(np.asarray(truth)), note
        except UserError as e:
            out["truth_error"] = str(e)
        except Exception as e:  # unreadable truth: the prediction is still written
            out["truth_error"] = f"{item.truth.origin}: {type(e).__name__}: {e}"
    return out


def read_truth(item: Item, size: tuple[int, int],
               stored: tuple[int, int]) -> tuple[Image.Image, str]:
    """The truth mask at `size` (h, w). A shard's mask stored downscaled with its image is
    resized (nearest) to the original size; any other size mismatch is an error."""
    assert item.truth is not None
    check_before_reading(item.truth)
    data = item.truth.read()
    if item.truth_scaled and stored != size:
        mask = load_mask(data, item.truth.origin, expected_size=stored)
        return (mask.resize((size[1], size[0]), Image.NEAREST),
                f"truth resized from the shard's {stored[1]}x{stored[0]}")
    mask, orientation = load_mask_oriented(data, item.truth.origin, expected_size=size)
    note = (f"truth carries EXIF orientation {orientation}: read unrotated, as the ISIC scorer "
            "reads it" if orientation != 1 else "")
    return mask, note


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decoded images; keep per-item extras (and failures) as lists. `fine`: the
    good items' finer copies (None where an item has none), or None when no item has one."""
    good = [s for s in samples if "error" not in s]
    images = stack_images([s.pop("image") for s in good]) if good else None
    fine = [s.pop("fine", None) for s in good]
    return {"images": images, "fine": fine if any(f is not None for f in fine) else None,
            "good": good, "failed": [s for s in samples if "error" in s]}
