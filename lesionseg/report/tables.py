"""The report's tables: settings, counts, scores, the failure line and the error split,
the failures, and the sortable table of every image."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from lesionseg.report.figures import (
    ISIC_FAILURE_JACCARD,
    error_type,
    lesion_fraction,
    num,
    pct,
    pred_fraction,
    quartiles,
)
from lesionseg.report.style import EVEN_COLOUR, FN_COLOUR, FP_COLOUR

# The settings shown first, looked up at summary.json's top level, then in its config's infer
# section; any other scalar top-level entry that is not a count is shown after them.
SETTING_KEYS = ("threshold", "postprocess", "tta", "refine", "image_size", "device", "precision",
                "mixed_precision")
COUNT_KEYS = {"complete", "missing_parts", "num_shards", "images_found", "masks_written", "scored",
              "metrics_failed", "without_truth", "errors", "skipped_files", "skipped_examples",
              "truth_masks_found", "truth_masks_unused", "means", "failures", "checkpoint",
              "config", "throughput", "splits_read", "left_out_by_split", "means_by_split",
              "means_splits", "means_note", "inputs", "masks"}
# Skipped files named per reason in the counts (summary.json's skipped_examples holds the
# first SKIP_EXAMPLES of each reason).
SKIPPED_SHOWN = 3
SCORE_NAMES = (("dice", "Dice"), ("jaccard", "Jaccard (IoU)"), ("threshold_jaccard",
               "thresholded Jaccard"), ("sensitivity", "sensitivity"),
               ("specificity", "specificity"), ("accuracy", "accuracy"))


def kv_table(pairs: list[tuple[str, str]]) -> str:
    """A two-column table; values are HTML already."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{body}</table>'


def settings(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) of every setting summary.json carries: the checkpoint first, then
    SETTING_KEYS (top level, else the config's infer section), then any other scalar."""
    ckpt = summary.get("checkpoint") or {}
    infer_cfg = (summary.get("config") or {}).get("infer") or {}
    out: list[tuple[str, str]] = []
    if ckpt.get("path"):
        out.append(("checkpoint", ckpt["path"]))
    if ckpt.get("sha256"):
        out.append(("checkpoint sha256", ckpt["sha256"]))
    for i, member in enumerate(ckpt.get("members") or []):
        out.append((f"model {i + 1} of {len(ckpt['members'])}",
                    f"{member.get('path')} (sha256 {str(member.get('sha256'))[:16]}…)"))
    if summary.get("inputs"):
        out.append(("inputs", ", ".join(summary["inputs"])))
    if summary.get("masks"):
        out.append(("truth from", ", ".join(summary["masks"])))
    meta = ckpt.get("meta") or {}
    if meta.get("step") is not None:
        val = meta.get("val") or {}
        best = meta.get("best_metric") or "dice"
        score = f", val {best} {num(val[best])}" if isinstance(val.get(best), float) else ""
        which = {"final": ", final weights", "best": ", best val weights"}.get(
            str(meta.get("select") or ("best" if meta.get("best_metric") else "")), "")
        out.append(("trained", f"step {meta['step']}{score}{which}"))
    for key in SETTING_KEYS:
        value = summary[key] if key in summary else infer_cfg.get(key)
        if key == "refine" and key in summary:  # the zoom cap applied, 0 = none
            value = (f"lesion-centred second pass, zoom up to {float(value):.2f}×" if value
                     else "off")
        if value is not None and value != "":
            out.append((key.replace("_", " "), num(value)))
    for key, value in summary.items():
        if key not in COUNT_KEYS and key not in SETTING_KEYS and (
                isinstance(value, (str, int, float, bool))):
            out.append((key.replace("_", " "), num(value)))
    for folder, splits in (summary.get("splits_read") or {}).items():
        out.append((f"splits scored ({Path(folder).name})", ", ".join(splits)))
    left_out = summary.get("left_out_by_split") or {}
    if left_out:
        out.append(("left out (infer.splits)", ", ".join(f"{n} {s}" for s, n in left_out.items())))
    return out


def split_table(summary: dict[str, Any]) -> str:
    """Each split's own means when several splits were scored (empty otherwise): a mean
    pooled over training and test images is no test score."""
    by_split = summary.get("means_by_split") or {}
    if len(by_split) < 2:
        return ""
    head = "".join(f'<th class="n">{html.escape(s)} ({m.get("images")})</th>'
                   for s, m in by_split.items())
    body = "".join(f'<tr><th>{label}</th>' + "".join(
        f'<td class="n">{num(m.get(key))}</td>' for m in by_split.values()) + "</tr>"
        for key, label in SCORE_NAMES)
    return (f'<h3>Per split</h3><p class="bad">{html.escape(summary.get("means_note", ""))}: '
            f'quote the test split\'s own means.</p><table><tr><th>metric</th>{head}</tr>'
            f'{body}</table>')


def counts(summary: dict[str, Any], errors_href: str) -> list[tuple[str, str]]:
    rows = [("images found", summary.get("images_found")),
            ("masks written", summary.get("masks_written")),
            ("scored against truth", summary.get("scored")),
            ("without truth", summary.get("without_truth")),
            ("truth unusable", summary.get("metrics_failed"))]
    out = [(k, html.escape(num(v))) for k, v in rows if v is not None]
    errors = summary.get("errors", 0)
    link = f' — <a href="{errors_href}">errors.csv</a>'
    out.append(("errors", f'<span class="{"bad" if errors else ""}">{errors}</span>{link}'))
    examples = summary.get("skipped_examples") or {}
    for reason, n in (summary.get("skipped_files") or {}).items():
        names = [Path(f).name for f in examples.get(reason, [])[:SKIPPED_SHOWN]]
        more = " …" if n > len(names) else ""
        out.append((f"skipped: {reason}", html.escape(f"{n}" + (f" ({', '.join(names)}{more})"
                                                                  if names else ""))))
    if not summary.get("complete", True):
        out.append(("complete", f'<span class="bad">no: parts {html.escape(str(summary.get("missing_parts")))} '
                                'missing</span>'))
    ips = (summary.get("throughput") or {}).get("images_per_s")
    if ips:
        out.append(("images/s", html.escape(num(ips, 2))))
    return out


def score_table(scored: list[dict[str, Any]], means: dict[str, Any]) -> str:
    head = ('<tr><th>metric</th><th class="n">mean</th><th class="n">median</th>'
            '<th class="n">IQR (Q1–Q3)</th><th class="n">min</th></tr>')
    body = []
    for key, label in SCORE_NAMES:
        values = [r[key] for r in scored if isinstance(r.get(key), float)]
        if not values:
            continue
        q1, med, q3 = quartiles(values)
        mean = means.get(key, float(np.mean(values)))
        body.append(f'<tr><th>{label}</th><td class="n">{num(mean)}</td><td class="n">'
                    f'{num(med)}</td><td class="n">{num(q1)}–{num(q3)}</td><td class="n">'
                    f'{num(min(values))}</td></tr>')
    return f"<table>{head}{''.join(body)}</table>"


def failure_line(scored: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The sentence on the ISIC failure line, and the failing rows."""
    failing = [r for r in scored if r["jaccard"] < ISIC_FAILURE_JACCARD]
    n = len(scored)
    text = (f'<p class="lead"><b>{len(failing)}</b> of {n} images ({pct(len(failing) / n)}) '
            f'fall below Jaccard {ISIC_FAILURE_JACCARD} — the ISIC failure line, where the '
            'thresholded Jaccard scores an image 0.</p>')
    return text, failing


def error_split(scored: list[dict[str, Any]], failing: list[dict[str, Any]]) -> str:
    def count(rows: list[dict[str, Any]]) -> dict[str, int]:
        kinds = [error_type(r) for r in rows if r["fp"] + r["fn"] > 0]
        return {k: kinds.count(k) for k in ("FP", "FN", "even")}

    every, fail = count(scored), count(failing)
    head = ('<tr><th>dominant error</th><th class="n">below the line</th>'
            '<th class="n">all imperfect images</th></tr>')
    body = "".join(
        f'<tr><th><span class="key" style="background:{c}"></span>{label}</th>'
        f'<td class="n">{fail[k]}</td><td class="n">{every[k]}</td></tr>'
        for k, label, c in (("FP", "false positives (over-segmented)", FP_COLOUR),
                            ("FN", "false negatives (under-segmented)", FN_COLOUR),
                            ("even", "as many of each", EVEN_COLOUR)))
    return f"<table>{head}{body}</table>"


def _href(relative: str) -> str:
    return html.escape(quote(relative, safe="/"))


def _input_link(origin: str, roots: list[str]) -> str:
    """The input, shown relative to the --input it came from (the full path on hover), as a
    file:// link when it is a plain file, as text inside an archive."""
    shown, full = origin, os.path.abspath(origin) if origin else origin
    for root in sorted(roots, key=len, reverse=True):
        if full.startswith(root.rstrip(os.sep) + os.sep):
            shown = full[len(root.rstrip(os.sep)) + 1:]
            break
    text, title = html.escape(shown), html.escape(origin)
    if origin and os.path.isfile(origin):
        return f'<a title="{title}" href="{html.escape(Path(origin).resolve().as_uri())}">{text}</a>'
    return f'<span title="{title}">{text}</span>'


def image_table(rows: list[dict[str, Any]], out: Path, roots: list[str] = ()) -> str:
    """Every image: scores, sizes, dominant error, status, and links to its mask, overlay
    thumbnail and input. Header clicks sort it (SCRIPT)."""
    has_truth = any(isinstance(r.get("dice"), float) for r in rows)
    has_split = any(r.get("split") for r in rows)
    cols: list[tuple[str, str, bool]] = [("id", "id", False)]  # (key, header, numeric)
    if has_split:
        cols.append(("split", "split", False))
    if has_truth:
        cols += [("dice", "Dice", True), ("jaccard", "Jaccard", True),
                 ("sensitivity", "sens.", True), ("specificity", "spec.", True),
                 ("lesion", "lesion %", True)]
    cols.append(("predicted", "predicted %", True))
    if any(r.get("uncertainty") is not None for r in rows):
        cols += [("uncertainty", "uncertainty", True), ("expected_dice", "exp. Dice", True),
                 ("needs_review", "review", False)]
    if has_truth:
        cols += [("fp", "FP px", True), ("fn", "FN px", True), ("error", "dominant", False)]
    cols += [("status", "status", False), ("mask", "mask", False), ("input", "input", False)]
    head = "".join(f'<th data-key="{k}"{" class=n" if numeric else ""}>{html.escape(h)}</th>'
                   for k, h, numeric in cols)
    thumbs_dir = out / "thumbs"
    body = []
    for r in rows:
        cells = []
        for key, _, numeric in cols:
            if key == "id":
                link = f"thumbs/{r['id']}.jpg"
                cell = (f'<a href="{_href(link)}">{html.escape(r["id"])}</a>'
                        if (thumbs_dir / f"{r['id']}.jpg").is_file() else html.escape(r["id"]))
                cells.append(f"<td>{cell}</td>")
            elif key in ("lesion", "predicted"):
                v = lesion_fraction(r) if key == "lesion" else pred_fraction(r)
                flag = ' class="n flag"' if key == "predicted" and v == 0 else ' class="n"'
                cells.append(f'<td{flag} data-v="{"" if v is None else f"{v:.6g}"}">'
                             f'{pct(v)}{" empty" if key == "predicted" and v == 0 else ""}</td>')
            elif key == "error":
                cells.append(f"<td>{error_type(r) if r.get('fp', 0) or r.get('fn', 0) else ''}</td>")
            elif key == "mask":
                mask = r.get("mask") or f"masks/{r['id']}_Segmentation.png"
                cells.append(f'<td><a href="{_href(mask)}">mask</a></td>')
            elif key == "input":
                cells.append(f"<td>{_input_link(str(r.get('input', '')), list(roots))}</td>")
            elif key == "status":
                reason = html.escape(str(r.get("reason") or ""))
                cells.append(f'<td title="{reason}">{html.escape(str(r.get("status", "")))}</td>')
            elif key == "needs_review":
                cells.append('<td class="flag">review</td>' if r.get(key) else "<td></td>")
            elif numeric:
                v = r.get(key)
                shown = num(v, 4 if isinstance(v, float) else 0) if v is not None else ""
                cells.append(f'<td class="n" data-v="{"" if v is None else v}">{shown}</td>')
            else:
                cells.append(f"<td>{html.escape(str(r.get(key) or ''))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="tablewrap"><table id="images"><thead><tr>{head}</tr></thead><tbody>'
            f'{"".join(body)}</tbody></table></div>')


def failures_table(summary: dict[str, Any], errors_href: str) -> str:
    failures = summary.get("failures", [])
    if not failures:
        return f'<p>No input failed (<a href="{errors_href}">errors.csv</a> is empty).</p>'
    rows = "".join(
        f"<tr><td>{html.escape(f['id'])}</td><td>{html.escape(f['input'])}</td>"
        f"<td class='bad'>{html.escape(f['reason'])}</td></tr>" for f in failures[:200])
    more = f"<p>…and {len(failures) - 200} more.</p>" if len(failures) > 200 else ""
    return (f'<p>Every one is in <a href="{errors_href}">errors.csv</a>.</p>'
            f"<table><tr><th>id</th><th>input</th><th>reason</th></tr>{rows}</table>{more}")
