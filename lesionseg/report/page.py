"""report.html: the page a researcher reads first after an inference run.

In order: the settings that produced it (checkpoint, threshold, post-processing, TTA, image
size, device, precision — whatever summary.json carries), the counts (with a link to
errors.csv), the images to review first (lesionseg.report.review), the scores as mean, median and IQR with the number of images below the ISIC
failure line (Jaccard 0.65), how the failures split into false-positive- and false-negative-
dominated cases, a Dice histogram and Dice against lesion size (inline SVG), galleries of the
worst and best cases and of the most over- and under-segmented ones (thumbnails with the
prediction's and the truth's outlines), and a sortable table of every image linking to its
mask, overlay and input. Without truth: the predictions, largest and smallest predicted
lesion first, empty predictions flagged.

Self-contained: inline CSS, SVG and base64 thumbnails, and a short script that sorts the
table (the page reads fine without it); nothing is fetched. Sized for thousands of images:
the table is plain rows and the galleries embed at most `infer.report_images` thumbnails.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from lesionseg.files import atomic_write_text
from lesionseg.report.figures import (
    ISIC_FAILURE_JACCARD,
    dice_vs_size_svg,
    histogram_svg,
    pct,
    pred_fraction,
    quartiles,
)
from lesionseg.report.gallery import Thumbs, galleries
from lesionseg.report.review import review_section
from lesionseg.report.style import CSS, FN_COLOUR, FP_COLOUR, SCRIPT
from lesionseg.report.tables import (
    counts,
    error_split,
    failure_line,
    failures_table,
    image_table,
    kv_table,
    score_table,
    settings,
    split_table,
)


def write_report(path: str | Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                 thumbs: str | Path, limit: int | None = None, title: str = "Inference report",
                 extra: str = "") -> Path:
    """Write report.html from the merged summary, the metrics rows (one per image with a mask)
    and the thumbnail folder; links are relative to the report's folder. `extra` (HTML) goes
    after the scores (the cross-validation's per-fold table)."""
    path = Path(path)
    if limit is None:
        limit = int(summary.get("config", {}).get("infer", {}).get("report_images", 60))
    thumbs = Thumbs(Path(thumbs))
    errors_href = "errors.csv"
    scored = [r for r in rows if isinstance(r.get("dice"), float)]
    bare = [r for r in rows if not isinstance(r.get("dice"), float)]
    errors = summary.get("errors", 0)
    lead = (f"{len(rows)} images segmented, {len(scored)} scored against truth, "
            f"{errors} error{'' if errors == 1 else 's'}")
    review = summary.get("review")
    if review:
        lead += f", {review['flagged']} flagged for review"
    warning = summary.get("warning")
    sections = [f'<h1>{html.escape(title)}</h1><p class="lead">{html.escape(lead)}.</p>'
                + (f'<p class="lead bad">WARNING — {html.escape(warning)}.</p>' if warning
                   else ""),
                '<div class="cols"><div><h2>Settings</h2>', kv_table(
                    [(k, html.escape(v)) for k, v in settings(summary)]),
                "</div><div><h2>Counts</h2>", kv_table(counts(summary, errors_href)),
                "</div></div>", review_section(summary, rows, thumbs, limit)]
    if scored:
        line, failing = failure_line(scored)
        pooled = summary.get("means_splits") or []
        which = (f", {pooled[0]} split" if len(pooled) == 1 else
                 f", pooled over the {' and '.join(pooled)} splits" if pooled else "")
        sections += [f"<h2>Scores ({len(scored)} images{which})</h2>", line,
                     score_table(scored, summary.get("means") or {}), split_table(summary),
                     "<h3>Where the errors come from</h3>", error_split(scored, failing),
                     '<div class="cols"><div><h3>Dice per image</h3>',
                     histogram_svg([r["dice"] for r in scored], "Dice",
                                   marker=2 * ISIC_FAILURE_JACCARD / (1 + ISIC_FAILURE_JACCARD)),
                     "</div><div><h3>Dice against lesion size</h3>", dice_vs_size_svg(scored),
                     f'<br><span class="key" style="background:{FP_COLOUR}"></span>FP-dominated '
                     f'<span class="key" style="background:{FN_COLOUR}"></span>FN-dominated '
                     '<span class="key" style="background:#b00;height:2px"></span>'
                     f'Jaccard {ISIC_FAILURE_JACCARD}</div></div>']
    if extra:
        sections.append(extra)
    if bare:
        fractions = [f for f in (pred_fraction(r) for r in bare) if f is not None]
        empty = sum(1 for f in fractions if f == 0)
        sections += [f"<h2>Predictions without truth ({len(bare)} images)</h2>",
                     f'<p class="lead">{empty} empty prediction{"s" if empty != 1 else ""}'
                     f'{" (flagged below)" if empty else ""}; median predicted lesion '
                     f'{pct(quartiles(fractions)[1]) if fractions else "n/a"} of the image.</p>',
                     histogram_svg(fractions, "predicted lesion area as a share of the image")
                     if fractions else ""]
    sections += ["<h2>Cases</h2>", galleries(rows, thumbs, limit),
                 f"<h2>Every image ({len(rows)})</h2><p>Click a column to sort; "
                 "<code>report.html#sort=dice:asc</code> opens sorted. Links: the id opens the "
                 "overlay thumbnail, then the mask and the input.</p>",
                 image_table(rows, path.parent, summary.get("inputs") or []),
                 f"<h2>Failures ({len(summary.get('failures', []))})</h2>",
                 failures_table(summary, errors_href)]
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width">'
            f"<title>lesionseg {html.escape(title.lower())}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(sections) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
    return atomic_write_text(path, page)
