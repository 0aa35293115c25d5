"""report.html: the page a researcher reads first after an inference run.

In order: the settings that produced it (checkpoint, threshold, post-processing, TTA, image
size, device, precision — whatever summary.json carries), the counts (with a link to
errors.csv), the scores as mean, median and IQR with the number of images below the ISIC
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

import base64
import html
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from lesionseg.files import atomic_write_text

HIST_BINS = 20
ISIC_FAILURE_JACCARD = 0.65  # the ISIC 2016 thresholded-Jaccard line: below it an image scores 0
# The settings shown first, looked up at summary.json's top level, then in its config's infer
# section; any other scalar top-level entry that is not a count is shown after them.
SETTING_KEYS = ("threshold", "postprocess", "tta", "image_size", "device", "precision",
                "mixed_precision")
COUNT_KEYS = {"complete", "missing_parts", "num_shards", "images_found", "masks_written", "scored",
              "metrics_failed", "without_truth", "errors", "skipped_files", "truth_masks_found",
              "truth_masks_unused", "means", "failures", "checkpoint", "config", "throughput",
              "shard_splits_read", "inputs", "masks"}
SCORE_NAMES = (("dice", "Dice"), ("jaccard", "Jaccard (IoU)"), ("threshold_jaccard",
               "thresholded Jaccard"), ("sensitivity", "sensitivity"),
               ("specificity", "specificity"), ("accuracy", "accuracy"))
FP_COLOUR, FN_COLOUR, EVEN_COLOUR = "#d95f02", "#7570b3", "#777"
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1320px;color:#222;
line-height:1.35}h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{padding:2px 9px;text-align:left;border-bottom:1px solid #e4e4e4}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.kv th{font-weight:600;color:#444}
.lead{font-size:1.1em;color:#333}.cols{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:200px;font-size:12px}
.card img{width:200px;height:160px;object-fit:contain;display:block;border:1px solid #ccc;background:#eee}
.bad{color:#b00}.flag{background:#fde0dc}.key{display:inline-block;width:1.6em;height:.5em;
vertical-align:middle;margin:0 .3em}#images th{cursor:pointer;position:sticky;top:0;
background:#f4f4f4;white-space:nowrap}#images th[aria-sort=ascending]::after{content:" \\25B2"}
#images th[aria-sort=descending]::after{content:" \\25BC"}#images{font-size:13px}
.tablewrap{max-height:80vh;overflow:auto;border:1px solid #ddd}"""
# Sorts the per-image table on a header click (numbers by data-v, blanks last either way);
# `report.html#sort=dice:desc` sorts on load (a link can point at the worst cases).
SCRIPT = """(function(){var t=document.getElementById('images');if(!t)return;
var hs=Array.prototype.slice.call(t.tHead.rows[0].cells),b=t.tBodies[0];
function val(r,i,num){var c=r.cells[i],v=c.getAttribute('data-v');if(v===null)v=c.textContent;
return num?(v===''?NaN:parseFloat(v)):v.toLowerCase();}
function sortBy(i,desc){var num=hs[i].classList.contains('n'),rows=Array.prototype.slice.call(b.rows);
var keyed=rows.map(function(r,k){return[val(r,i,num),k,r];});
keyed.sort(function(x,y){var a=x[0],c=y[0];if(num){var na=isNaN(a),nc=isNaN(c);
if(na||nc)return na===nc?x[1]-y[1]:(na?1:-1);if(a!==c)return desc?c-a:a-c;return x[1]-y[1];}
if(a!==c)return(desc?a<c:a>c)?1:-1;return x[1]-y[1];});
var f=document.createDocumentFragment();keyed.forEach(function(k){f.appendChild(k[2]);});
b.appendChild(f);hs.forEach(function(h){h.removeAttribute('aria-sort');});
hs[i].setAttribute('aria-sort',desc?'descending':'ascending');}
hs.forEach(function(h,i){h.addEventListener('click',function(){
sortBy(i,h.getAttribute('aria-sort')==='ascending');});});
var m=/sort=([\\w-]+)(?::(asc|desc))?/.exec(location.hash);if(m){hs.forEach(function(h,i){
if(h.getAttribute('data-key')===m[1])sortBy(i,m[2]==='desc');});}})();"""


# --------------------------------------------------------------------------- numbers


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
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


def _lesion_fraction(row: dict[str, Any]) -> float | None:
    """The truth's lesion area as a fraction of the image."""
    if not isinstance(row.get("tp"), int):
        return None
    total = row["tp"] + row["fp"] + row["fn"] + row["tn"]
    return (row["tp"] + row["fn"]) / total if total else None


def _pred_fraction(row: dict[str, Any]) -> float | None:
    value = row.get("pred_fraction")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(row.get("tp"), int):
        total = row["tp"] + row["fp"] + row["fn"] + row["tn"]
        return (row["tp"] + row["fp"]) / total if total else None
    return None


# --------------------------------------------------------------------------- charts (SVG)


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
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{above + plot_h}" '
                 f'y2="{above + plot_h}" stroke="#444"/><line x1="{left}" x2="{left}" '
                 f'y1="{above}" y2="{above + plot_h}" stroke="#444"/>'
                 f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">'
                 f'{html.escape(xlabel)}</text><text transform="translate(12 {above + plot_h / 2})'
                 ' rotate(-90)" text-anchor="middle">images</text></svg>')
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
        size = _lesion_fraction(r)
        if size is None or not size or not isinstance(r.get("dice"), float):
            continue
        parts.append(f'<circle cx="{x_of(size):.1f}" cy="{y_of(r["dice"]):.1f}" r="3" '
                     f'fill="{colours.get(error_type(r), EVEN_COLOUR)}" fill-opacity="0.7">'
                     f'<title>{html.escape(r["id"])}: Dice {r["dice"]:.3f}, lesion '
                     f'{_pct(size)}</title></circle>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{above + plot_h}" '
                 f'y2="{above + plot_h}" stroke="#444"/><line x1="{left}" x2="{left}" '
                 f'y1="{above}" y2="{above + plot_h}" stroke="#444"/>'
                 f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">'
                 'lesion area (truth) as a share of the image, log scale</text>'
                 f'<text transform="translate(12 {above + plot_h / 2}) rotate(-90)" '
                 'text-anchor="middle">Dice</text></svg>')
    return "".join(parts)


# --------------------------------------------------------------------------- sections


def _kv_table(pairs: list[tuple[str, str]]) -> str:
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
        score = f", val {best} {_num(val[best])}" if isinstance(val.get(best), float) else ""
        which = {"final": ", final weights", "best": ", best val weights"}.get(
            str(meta.get("select") or ("best" if meta.get("best_metric") else "")), "")
        out.append(("trained", f"step {meta['step']}{score}{which}"))
    for key in SETTING_KEYS:
        value = summary[key] if key in summary else infer_cfg.get(key)
        if value is not None and value != "":
            out.append((key.replace("_", " "), _num(value)))
    for key, value in summary.items():
        if key not in COUNT_KEYS and key not in SETTING_KEYS and (
                isinstance(value, (str, int, float, bool))):
            out.append((key.replace("_", " "), _num(value)))
    for folder, splits in (summary.get("shard_splits_read") or {}).items():
        out.append((f"shard splits read ({Path(folder).name})", ", ".join(splits)))
    return out


def _counts(summary: dict[str, Any], errors_href: str) -> list[tuple[str, str]]:
    rows = [("images found", summary.get("images_found")),
            ("masks written", summary.get("masks_written")),
            ("scored against truth", summary.get("scored")),
            ("without truth", summary.get("without_truth")),
            ("truth unusable", summary.get("metrics_failed"))]
    out = [(k, html.escape(_num(v))) for k, v in rows if v is not None]
    errors = summary.get("errors", 0)
    link = f' — <a href="{errors_href}">errors.csv</a>'
    out.append(("errors", f'<span class="{"bad" if errors else ""}">{errors}</span>{link}'))
    if not summary.get("complete", True):
        out.append(("complete", f'<span class="bad">no: parts {html.escape(str(summary.get("missing_parts")))} '
                                'missing</span>'))
    ips = (summary.get("throughput") or {}).get("images_per_s")
    if ips:
        out.append(("images/s", html.escape(_num(ips, 2))))
    return out


def _score_table(scored: list[dict[str, Any]], means: dict[str, Any]) -> str:
    head = ('<tr><th>metric</th><th class="n">mean</th><th class="n">median</th>'
            '<th class="n">IQR (Q1–Q3)</th><th class="n">min</th></tr>')
    body = []
    for key, label in SCORE_NAMES:
        values = [r[key] for r in scored if isinstance(r.get(key), float)]
        if not values:
            continue
        q1, med, q3 = quartiles(values)
        mean = means.get(key, float(np.mean(values)))
        body.append(f'<tr><th>{label}</th><td class="n">{_num(mean)}</td><td class="n">'
                    f'{_num(med)}</td><td class="n">{_num(q1)}–{_num(q3)}</td><td class="n">'
                    f'{_num(min(values))}</td></tr>')
    return f"<table>{head}{''.join(body)}</table>"


def _failure_line(scored: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The sentence on the ISIC failure line, and the failing rows."""
    failing = [r for r in scored if r["jaccard"] < ISIC_FAILURE_JACCARD]
    n = len(scored)
    text = (f'<p class="lead"><b>{len(failing)}</b> of {n} images ({_pct(len(failing) / n)}) '
            f'fall below Jaccard {ISIC_FAILURE_JACCARD} — the ISIC failure line, where the '
            'thresholded Jaccard scores an image 0.</p>')
    return text, failing


def _error_split(scored: list[dict[str, Any]], failing: list[dict[str, Any]]) -> str:
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


class _Thumbs:
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


def _card(row: dict[str, Any], thumbs: _Thumbs) -> str:
    uri = thumbs.uri(row["id"])
    img = (f'<img loading="lazy" alt="{html.escape(row["id"])}" src="{uri}">' if uri
           else '<div class="bad">(no thumbnail)</div>')
    lines = [f"<b>{html.escape(row['id'])}</b>"]
    if isinstance(row.get("dice"), float):
        lines.append(f"Dice {row['dice']:.3f} · Jaccard {row['jaccard']:.3f}")
        lines.append(f"FP {row['fp']} · FN {row['fn']} px · lesion {_pct(_lesion_fraction(row))}")
    pred = _pred_fraction(row)
    if pred is not None:
        lines.append(f"predicted {_pct(pred)}" + (' <span class="bad">EMPTY</span>'
                                                   if not pred else ""))
    return f'<div class="card">{img}{"<br>".join(lines)}</div>'


def _gallery(title: str, note: str, rows: list[dict[str, Any]], thumbs: _Thumbs) -> str:
    if not rows:
        return ""
    cards = "".join(_card(r, thumbs) for r in rows)
    return f'<h3>{html.escape(title)}</h3><p>{note}</p><div class="grid">{cards}</div>'


def _galleries(rows: list[dict[str, Any]], thumbs: _Thumbs, limit: int) -> str:
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
        empty = [r for r in bare if _pred_fraction(r) == 0]
        sized = sorted((r for r in bare if _pred_fraction(r)),
                       key=lambda r: (-(_pred_fraction(r) or 0), r["id"]))
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
    if has_truth:
        cols += [("fp", "FP px", True), ("fn", "FN px", True), ("error", "dominant", False)]
    cols += [("status", "status", False), ("mask", "mask", False), ("input", "input", False)]
    head = "".join(f'<th data-key="{k}"{" class=n" if num else ""}>{html.escape(h)}</th>'
                   for k, h, num in cols)
    thumbs_dir = out / "thumbs"
    body = []
    for r in rows:
        cells = []
        for key, _, num in cols:
            if key == "id":
                link = f"thumbs/{r['id']}.jpg"
                cell = (f'<a href="{_href(link)}">{html.escape(r["id"])}</a>'
                        if (thumbs_dir / f"{r['id']}.jpg").is_file() else html.escape(r["id"]))
                cells.append(f"<td>{cell}</td>")
            elif key in ("lesion", "predicted"):
                v = _lesion_fraction(r) if key == "lesion" else _pred_fraction(r)
                flag = ' class="n flag"' if key == "predicted" and v == 0 else ' class="n"'
                cells.append(f'<td{flag} data-v="{"" if v is None else f"{v:.6g}"}">'
                             f'{_pct(v)}{" empty" if key == "predicted" and v == 0 else ""}</td>')
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
            elif num:
                v = r.get(key)
                shown = _num(v, 4 if isinstance(v, float) else 0) if v is not None else ""
                cells.append(f'<td class="n" data-v="{"" if v is None else v}">{shown}</td>')
            else:
                cells.append(f"<td>{html.escape(str(r.get(key) or ''))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="tablewrap"><table id="images"><thead><tr>{head}</tr></thead><tbody>'
            f'{"".join(body)}</tbody></table></div>')


def _failures(summary: dict[str, Any], errors_href: str) -> str:
    failures = summary.get("failures", [])
    if not failures:
        return f'<p>No input failed (<a href="{errors_href}">errors.csv</a> is empty).</p>'
    rows = "".join(
        f"<tr><td>{html.escape(f['id'])}</td><td>{html.escape(f['input'])}</td>"
        f"<td class='bad'>{html.escape(f['reason'])}</td></tr>" for f in failures[:200])
    more = f"<p>…and {len(failures) - 200} more.</p>" if len(failures) > 200 else ""
    return (f'<p>Every one is in <a href="{errors_href}">errors.csv</a>.</p>'
            f"<table><tr><th>id</th><th>input</th><th>reason</th></tr>{rows}</table>{more}")


# --------------------------------------------------------------------------- the page


def write_report(path: str | Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                 thumbs: str | Path, limit: int | None = None, title: str = "Inference report",
                 extra: str = "") -> Path:
    """Write report.html from the merged summary, the metrics rows (one per image with a mask)
    and the thumbnail folder; links are relative to the report's folder. `extra` (HTML) goes
    after the scores (the cross-validation's per-fold table)."""
    path = Path(path)
    if limit is None:
        limit = int(summary.get("config", {}).get("infer", {}).get("report_images", 60))
    thumbs = _Thumbs(Path(thumbs))
    errors_href = "errors.csv"
    scored = [r for r in rows if isinstance(r.get("dice"), float)]
    bare = [r for r in rows if not isinstance(r.get("dice"), float)]
    errors = summary.get("errors", 0)
    lead = (f"{len(rows)} images segmented, {len(scored)} scored against truth, "
            f"{errors} error{'' if errors == 1 else 's'}")
    sections = [f'<h1>{html.escape(title)}</h1><p class="lead">{html.escape(lead)}.</p>',
                '<div class="cols"><div><h2>Settings</h2>', _kv_table(
                    [(k, html.escape(v)) for k, v in settings(summary)]),
                "</div><div><h2>Counts</h2>", _kv_table(_counts(summary, errors_href)),
                "</div></div>"]
    if scored:
        line, failing = _failure_line(scored)
        sections += [f"<h2>Scores ({len(scored)} images)</h2>", line,
                     _score_table(scored, summary.get("means") or {}),
                     "<h3>Where the errors come from</h3>", _error_split(scored, failing),
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
        fractions = [f for f in (_pred_fraction(r) for r in bare) if f is not None]
        empty = sum(1 for f in fractions if f == 0)
        sections += [f"<h2>Predictions without truth ({len(bare)} images)</h2>",
                     f'<p class="lead">{empty} empty prediction{"s" if empty != 1 else ""}'
                     f'{" (flagged below)" if empty else ""}; median predicted lesion '
                     f'{_pct(quartiles(fractions)[1]) if fractions else "n/a"} of the image.</p>',
                     histogram_svg(fractions, "predicted lesion area as a share of the image")
                     if fractions else ""]
    sections += ["<h2>Cases</h2>", _galleries(rows, thumbs, limit),
                 f"<h2>Every image ({len(rows)})</h2><p>Click a column to sort; "
                 "<code>report.html#sort=dice:asc</code> opens sorted. Links: the id opens the "
                 "overlay thumbnail, then the mask and the input.</p>",
                 image_table(rows, path.parent, summary.get("inputs") or []),
                 f"<h2>Failures ({len(summary.get('failures', []))})</h2>",
                 _failures(summary, errors_href)]
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width">'
            f"<title>lesionseg {html.escape(title.lower())}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(sections) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
    return atomic_write_text(path, page)
