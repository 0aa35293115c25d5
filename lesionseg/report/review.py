"""The report's "review these first" section: the images whose expected Dice is below the
review level (lesionseg.quality), most uncertain first, as thumbnails with the prediction's
(and the truth's) outlines; with truth, how well the flag did and the failures it missed."""

from __future__ import annotations

import html
from typing import Any

from lesionseg.postprocess import FALLBACK_NOTE
from lesionseg.quality import missed_failures
from lesionseg.report.gallery import Thumbs


def flagged_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flagged images, most uncertain first (ties by id)."""
    return sorted((r for r in rows if r.get("needs_review")),
                  key=lambda r: (-float(r.get("uncertainty") or 0), r["id"]))


def _card(row: dict[str, Any], thumbs: Thumbs) -> str:
    uri = thumbs.uri(row["id"])
    img = (f'<img loading="lazy" alt="{html.escape(row["id"])}" src="{uri}">' if uri
           else '<div class="bad">(no thumbnail)</div>')
    lines = [f"<b>{html.escape(row['id'])}</b>", f"uncertainty {float(row['uncertainty']):.3f}",
             f"expected Dice {float(row['expected_dice']):.2f}"]
    if isinstance(row.get("dice"), float):
        lines.append(f"true Dice {row['dice']:.3f}")
    if FALLBACK_NOTE in str(row.get("reason") or ""):
        lines.append('<span class="bad">no lesion found: the most confident region</span>')
    return f'<div class="card">{img}{"<br>".join(lines)}</div>'


def _grid(rows: list[dict[str, Any]], thumbs: Thumbs) -> str:
    """The rows' cards in one grid."""
    return '<div class="grid">' + "".join(_card(r, thumbs) for r in rows) + "</div>"


def review_section(summary: dict[str, Any], rows: list[dict[str, Any]], thumbs: Thumbs,
                   limit: int) -> str:
    """The section's HTML ('' when the run has no quality columns)."""
    review = summary.get("review")
    if not review:
        return ""
    flagged = flagged_rows(rows)
    level = review.get("level")
    truth = review.get("with_truth")
    parts = [f"<h2>Review these first ({len(flagged)} of {review['images']} flagged)</h2>",
             f"<p>Flagged: expected Dice below {level} ({html.escape(review.get('expected_dice_model', ''))})"
             f"{_share_rule(review)}, or no pixel above the threshold (the mask is the most "
             f"confident region). Uncertainty: {html.escape(review.get('uncertainty', ''))}. Most uncertain "
             'first. Outlines: <span class="key" style="background:rgb(30,144,255)"></span>'
             "prediction" + (', <span class="key" style="background:rgb(255,215,0)"></span>truth'
                             if truth else "") + ".</p>"]
    if truth:
        auroc = truth.get("auroc_uncertainty")
        parts.append(
            f'<p class="lead">Against the truth: {truth["failures_caught"]} of '
            f'{truth["failures"]} images with Dice below {truth["failure_dice"]} flagged; '
            f'AUROC of the uncertainty for them '
            f'{"n/a" if auroc is None else f"{auroc:.3f}"}; expected Dice off by '
            f'{truth["expected_dice_mae"]:.3f} on average.</p>')
    if not flagged:
        parts.append("<p>No image is flagged.</p>")
    else:
        shown = flagged[:max(1, limit)]
        more = len(flagged) - len(shown)
        parts.append(_grid(shown, thumbs))
        if more:
            parts.append(f"<p>…and {more} more: the <code>needs_review</code> column of "
                         "metrics.csv, or the table below sorted by uncertainty "
                         "(<code>report.html#sort=uncertainty:desc</code>).</p>")
    missed = missed_failures(rows) if truth else []
    if missed:
        shown = missed[:max(1, limit)]
        parts += [f"<h3>Missed by the flags ({len(missed)} of {truth['failures']} images with "
                  f"Dice below {truth['failure_dice']})</h3><p>Not flagged, worst first: the "
                  "errors a reviewer of the flagged images alone would not see (the model was "
                  "sure of them).</p>", _grid(shown, thumbs)]
        if len(missed) > len(shown):
            parts.append(f"<p>…and {len(missed) - len(shown)} more: the table below sorted by "
                         "Dice (<code>report.html#sort=dice:asc</code>), those not flagged.</p>")
    return "".join(parts)


def _share_rule(review: dict[str, Any]) -> str:
    """', or uncertainty above C (the top S of the val images)', or '' when the share is off
    (or the run's summary predates it)."""
    cut, share = review.get("uncertainty_cut"), review.get("review_share")
    if cut is None or not share:
        return ""
    return (f", or uncertainty above {cut:g} (the {share:.0%} most uncertain of "
            f"{html.escape(review.get('uncertainty_cut_from', 'the val images'))})")
