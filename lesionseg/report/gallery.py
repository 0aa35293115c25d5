"""The report's galleries: thumbnails of the worst and best cases, the most over- and
under-segmented ones, and without truth the largest, smallest and empty predictions."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from lesionseg.report.figures import error_type, lesion_fraction, pct, pred_fraction


class Thumbs:
    """Base64 thumbnails from the thumbs folder, read once each."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.cache = folder, {}

    def uri(self, image_id: str) -> str | None:
        if image_id not in self.cache:
            path = self.folder / f"{image_id}.jpg"
            self.cache[image_id] = (f"data:image/jpeg;base64,"
                                    f"{base64.b64encode(path.read_bytes()).decode('ascii')}"
                                    if path.is_file() else None)
        return self.cache[image_id]


def _card(row: dict[str, Any], thumbs: Thumbs) -> str:
    uri = thumbs.uri(row["id"])
    img = (f'<img loading="lazy" alt="{html.escape(row["id"])}" src="{uri}">' if uri
           else '<div class="bad">(no thumbnail)</div>')
    lines = [f"<b>{html.escape(row['id'])}</b>"]
    if isinstance(row.get("dice"), float):
        lines.append(f"Dice {row['dice']:.3f} · Jaccard {row['jaccard']:.3f}")
        lines.append(f"FP {row['fp']} · FN {row['fn']} px · lesion {pct(lesion_fraction(row))}")
    pred = pred_fraction(row)
    if pred is not None:
        lines.append(f"predicted {pct(pred)}" + (' <span class="bad">EMPTY</span>'
                                                   if not pred else ""))
    return f'<div class="card">{img}{"<br>".join(lines)}</div>'


def _gallery(title: str, note: str, rows: list[dict[str, Any]], thumbs: Thumbs) -> str:
    if not rows:
        return ""
    cards = "".join(_card(r, thumbs) for r in rows)
    return f'<h3>{html.escape(title)}</h3><p>{note}</p><div class="grid">{cards}</div>'


def galleries(rows: list[dict[str, Any]], thumbs: Thumbs, limit: int) -> str:
    """Worst and best by Dice, most FP- and FN-dominated; without truth largest and smallest
    predicted lesion and the empty predictions. Together at most `limit` cards."""
    if limit <= 0:
        return ""
    scored = [r for r in rows if isinstance(r.get("dice"), float)]
    legend = ('Outlines: <span class="key" style="background:rgb(30,144,255)"></span>prediction'
              + (', <span class="key" style="background:rgb(255,215,0)"></span>truth.'
                 if scored else "."))
    bare = [r for r in rows if not isinstance(r.get("dice"), float)]
    parts = []
    share = max(1, limit // (4 * bool(scored) + bool(bare)))  # cards per gallery
    if scored:
        by_dice = sorted(scored, key=lambda r: (r["dice"], r["id"]))
        if len(scored) <= share * 2:
            parts.append(_gallery(f"All {len(scored)} scored images, worst first", legend,
                                  by_dice, thumbs))
        else:
            over = sorted((r for r in scored if error_type(r) == "FP"),
                          key=lambda r: (-r["fp"] / max(1, r["tp"] + r["fp"] + r["fn"]), r["id"]))
            under = sorted((r for r in scored if error_type(r) == "FN"),
                           key=lambda r: (-r["fn"] / max(1, r["tp"] + r["fp"] + r["fn"]), r["id"]))
            parts += [
                _gallery(f"Worst {min(share, len(by_dice))} by Dice", legend, by_dice[:share], thumbs),
                _gallery(f"Best {min(share, len(by_dice))} by Dice", legend,
                         by_dice[::-1][:share], thumbs),
                _gallery("Most over-segmented (false positives dominate)",
                         "By false-positive share of the union.", over[:share], thumbs),
                _gallery("Most under-segmented (false negatives dominate)",
                         "By false-negative share of the union.", under[:share], thumbs)]
    if bare:
        budget = limit if not scored else share
        empty = [r for r in bare if pred_fraction(r) == 0]
        sized = sorted((r for r in bare if pred_fraction(r)),
                       key=lambda r: (-(pred_fraction(r) or 0), r["id"]))
        if empty:
            parts.append(_gallery(f"{len(empty)} empty predictions", '<span class="bad">The model '
                                  'found no lesion in these images.</span> ' + legend,
                                  empty[:max(1, budget // 3)], thumbs))
        n = max(1, (budget - min(len(empty), max(1, budget // 3))) // 2)
        if len(sized) <= 2 * n:
            parts.append(_gallery(f"Predictions without truth, largest lesion first ({len(sized)})",
                                  legend, sized, thumbs))
        else:
            parts += [_gallery(f"Largest predicted lesions ({n})", legend, sized[:n], thumbs),
                      _gallery(f"Smallest predicted lesions ({n})", legend, sized[::-1][:n],
                               thumbs)]
    return "".join(parts)
