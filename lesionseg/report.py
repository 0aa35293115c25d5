"""report.html: one self-contained page per inference run, so a person can see where the model
fails — the summary, a histogram of per-image Dice (inline SVG) and overlay thumbnails
worst-first (inline base64 JPEGs; prediction tinted red, truth outlined green).

No scripts, no external files: the page can be mailed or archived with the run.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from lesionseg.files import atomic_write_text

HIST_BINS = 20
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:260px;font-size:12px}
.card img{max-width:256px;max-height:256px;display:block;border:1px solid #ccc}
.bad{color:#b00}"""


def dice_histogram_svg(values: list[float], bins: int = HIST_BINS, width: int = 520,
                       height: int = 180) -> str:
    """Per-image Dice in [0, 1] as an inline SVG bar chart (`bins` equal bins)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    top = max(counts, default=0) or 1
    pad, bar_w = 30, (width - 40) / bins
    bars = []
    for i, c in enumerate(counts):
        h = (height - 2 * pad) * c / top
        x, y = pad + i * bar_w, height - pad - h
        bars.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                    f'fill="#4a7bb7"><title>Dice {i / bins:.2f}–{(i + 1) / bins:.2f}: {c}</title></rect>')
    ticks = "".join(
        f'<text x="{pad + t * (width - 40) / 4:.1f}" y="{height - 10}" font-size="11" '
        f'text-anchor="middle">{t / 4:.2f}</text>' for t in range(5))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
            f'{"".join(bars)}{ticks}<text x="{pad}" y="14" font-size="11">max {top} images/bin'
            f'</text></svg>')


def _summary_table(summary: dict[str, Any]) -> str:
    means = summary.get("means", {})
    rows = [("images found", summary.get("images_found")),
            ("masks written", summary.get("masks_written")),
            ("scored against truth", summary.get("scored")),
            ("metrics failed (truth unusable)", summary.get("metrics_failed")),
            ("errors", summary.get("errors")),
            ("complete", summary.get("complete")),
            ("images/s", summary.get("throughput", {}).get("images_per_s")),
            ("threshold", summary.get("threshold")),
            ("post-processing", summary.get("postprocess")),
            ("flip TTA", summary.get("tta")),
            ("checkpoint", summary.get("checkpoint", {}).get("path")),
            ("checkpoint sha256", summary.get("checkpoint", {}).get("sha256"))]
    rows += [(f"mean {k}", _num(v)) for k, v in means.items() if k not in ("images", "iou")]
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table>{body}</table>"


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else str(v)


def _thumb_cards(rows: list[dict[str, Any]], thumbs: Path, limit: int) -> tuple[str, int]:
    """Cards for the `limit` worst images by Dice (rows without a thumbnail are left out)."""
    scored = sorted((r for r in rows if isinstance(r.get("dice"), float)),
                    key=lambda r: (r["dice"], r["id"]))
    cards, shown = [], 0
    for row in scored:
        if shown >= limit:
            break
        path = thumbs / f"{row['id']}.jpg"
        if not path.is_file():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        cards.append(f'<div class="card"><img alt="{html.escape(row["id"])}" '
                     f'src="data:image/jpeg;base64,{data}"><b>{html.escape(row["id"])}</b> '
                     f'Dice {row["dice"]:.3f} · IoU {row["jaccard"]:.3f}</div>')
        shown += 1
    return "".join(cards), shown


def write_report(path: str | Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                 thumbs: str | Path, limit: int | None = None) -> Path:
    """Write report.html from the merged summary, the metrics rows and the thumbnail folder."""
    if limit is None:
        limit = int(summary.get("config", {}).get("infer", {}).get("report_images", 60))
    dice = [r["dice"] for r in rows if isinstance(r.get("dice"), float)]
    cards, shown = _thumb_cards(rows, Path(thumbs), limit)
    failures = summary.get("failures", [])
    failure_rows = "".join(
        f"<tr><td>{html.escape(f['id'])}</td><td>{html.escape(f['input'])}</td>"
        f"<td class='bad'>{html.escape(f['reason'])}</td></tr>" for f in failures[:200])
    more = f"<p>…and {len(failures) - 200} more in errors.csv</p>" if len(failures) > 200 else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lesionseg inference report</title>
<style>{CSS}</style></head><body>
<h1>Inference report</h1>
{_summary_table(summary)}
<h2>Dice per image ({len(dice)} scored)</h2>
{dice_histogram_svg(dice) if dice else "<p>No image had ground truth.</p>"}
<h2>Worst {shown} images by Dice</h2>
<p>Prediction tinted red, ground truth outlined green.</p>
<div class="grid">{cards}</div>
<h2>Failures ({len(failures)})</h2>
<table><tr><th>id</th><th>input</th><th>reason</th></tr>{failure_rows}</table>{more}
</body></html>
"""
    return atomic_write_text(path, page)
