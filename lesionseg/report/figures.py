"""The report's numbers and charts: formatting, quartiles, each image's dominant error and
lesion shares, and the inline SVG histogram and Dice-against-size plot."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from lesionseg.report.style import EVEN_COLOUR, FN_COLOUR, FP_COLOUR

HIST_BINS = 20
ISIC_FAILURE_JACCARD = 0.65  # the ISIC 2016 thresholded-Jaccard line: below it an image scores 0


def num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def pct(v: float | None) -> str:
    if v is None:
        return ""
    return f"{100 * v:.2f}%" if v < 0.1 else f"{100 * v:.1f}%"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3), linear interpolation (numpy's default)."""
    q1, med, q3 = np.percentile(np.asarray(values, np.float64), [25, 50, 75])
    return float(q1), float(med), float(q3)


def error_type(row: dict[str, Any]) -> str:
    """'FP' when false positives outnumber false negatives (over-segmented), 'FN' for the
    reverse (under-segmented), 'even' when equal, '' without truth counts."""
    fp, fn = row.get("fp"), row.get("fn")
    if not isinstance(fp, int) or not isinstance(fn, int):
        return ""
    return "FP" if fp > fn else "FN" if fn > fp else "even"


def lesion_fraction(row: dict[str, Any]) -> float | None:
    """The truth's lesion area as a fraction of the image."""
    if not isinstance(row.get("tp"), int):
        return None
    total = row["tp"] + row["fp"] + row["fn"] + row["tn"]
    return (row["tp"] + row["fn"]) / total if total else None


def pred_fraction(row: dict[str, Any]) -> float | None:
    value = row.get("pred_fraction")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(row.get("tp"), int):
        total = row["tp"] + row["fp"] + row["fn"] + row["tn"]
        return (row["tp"] + row["fp"]) / total if total else None
    return None


def histogram_svg(values: list[float], xlabel: str, bins: int = HIST_BINS, width: int = 520,
                  height: int = 220, marker: float | None = None) -> str:
    """Values in [0, 1] as an inline SVG bar chart with both axes labelled; `marker` draws a
    dashed vertical line (e.g. the Dice of the ISIC failure line)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    top = max(counts, default=0) or 1
    left, right, above, below = 44, 18, 12, 40
    plot_w, plot_h = width - left - right, height - above - below
    bar_w = plot_w / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="histogram of {html.escape(xlabel)}" font-size="11">']
    for t in sorted({0, top // 2, top}):  # y axis: counts
        y = above + plot_h * (1 - t / top)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#ddd"/><text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t}'
                     '</text>')
    for i, c in enumerate(counts):
        h = plot_h * c / top
        parts.append(f'<rect x="{left + i * bar_w + 0.5:.1f}" y="{above + plot_h - h:.1f}" '
                     f'width="{bar_w - 1:.1f}" height="{h:.1f}" fill="#4a7bb7"><title>'
                     f'{i / bins:.2f}–{(i + 1) / bins:.2f}: {c} images</title></rect>')
    for t in range(6):  # x axis: 0.0 … 1.0
        x = left + plot_w * t / 5
        parts.append(f'<text x="{x:.1f}" y="{above + plot_h + 15}" text-anchor="middle">'
                     f'{t / 5:.1f}</text>')
    if marker is not None:
        x = left + plot_w * marker
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{above}" y2="{above + plot_h}" '
                     'stroke="#b00" stroke-dasharray="4 3"/>')
    parts.append(_axes(left, above, plot_w, plot_h, height, xlabel, "images"))
    return "".join(parts)


def dice_vs_size_svg(rows: list[dict[str, Any]], width: int = 620, height: int = 260) -> str:
    """Dice (y) against the truth's lesion area as a share of the image (x, log scale from
    0.1% to 100%), one dot per image, coloured by its dominant error; the dashed line is the
    Dice of the ISIC failure line."""
    left, right, above, below = 44, 18, 12, 40
    plot_w, plot_h = width - left - right, height - above - below
    lo, hi = -3.0, 0.0

    def x_of(fraction: float) -> float:
        return left + plot_w * (min(hi, max(lo, math.log10(max(fraction, 1e-9)))) - lo) / (hi - lo)

    def y_of(dice: float) -> float:
        return above + plot_h * (1 - dice)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'role="img" aria-label="Dice against lesion size" font-size="11">']
    for d in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y_of(d):.1f}" '
                     f'y2="{y_of(d):.1f}" stroke="#e4e4e4"/><text x="{left - 6}" '
                     f'y="{y_of(d) + 4:.1f}" text-anchor="end">{d:g}</text>')
    for f, label in ((0.001, "0.1%"), (0.01, "1%"), (0.1, "10%"), (1.0, "100%")):
        parts.append(f'<line x1="{x_of(f):.1f}" x2="{x_of(f):.1f}" y1="{above}" '
                     f'y2="{above + plot_h}" stroke="#e4e4e4"/><text x="{x_of(f):.1f}" '
                     f'y="{above + plot_h + 15}" text-anchor="middle">{label}</text>')
    line = 2 * ISIC_FAILURE_JACCARD / (1 + ISIC_FAILURE_JACCARD)
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y_of(line):.1f}" '
                 f'y2="{y_of(line):.1f}" stroke="#b00" stroke-dasharray="4 3"><title>Jaccard '
                 f'{ISIC_FAILURE_JACCARD} = Dice {line:.3f}</title></line>')
    colours = {"FP": FP_COLOUR, "FN": FN_COLOUR}
    for r in rows:
        size = lesion_fraction(r)
        if size is None or not size or not isinstance(r.get("dice"), float):
            continue
        parts.append(f'<circle cx="{x_of(size):.1f}" cy="{y_of(r["dice"]):.1f}" r="3" '
                     f'fill="{colours.get(error_type(r), EVEN_COLOUR)}" fill-opacity="0.7">'
                     f'<title>{html.escape(r["id"])}: Dice {r["dice"]:.3f}, lesion '
                     f'{pct(size)}</title></circle>')
    parts.append(_axes(left, above, plot_w, plot_h, height,
                       "lesion area (truth) as a share of the image, log scale", "Dice"))
    return "".join(parts)


# --------------------------------------------------------------------------- sections


def _axes(left: float, above: float, plot_w: float, plot_h: float, height: int, xlabel: str,
          ylabel: str) -> str:
    """A chart's x and y axis lines and labels, and the end of its SVG."""
    return (f'<line x1="{left}" x2="{left + plot_w}" y1="{above + plot_h}" '
            f'y2="{above + plot_h}" stroke="#444"/><line x1="{left}" x2="{left}" '
            f'y1="{above}" y2="{above + plot_h}" stroke="#444"/>'
            f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">'
            f'{html.escape(xlabel)}</text><text transform="translate(12 {above + plot_h / 2})'
            f' rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text></svg>')
