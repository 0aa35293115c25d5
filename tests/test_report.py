"""report.html: the HTML itself (settings, robust statistics, failure line, error split, table,
links, no network, size and speed at 1,000 images), and the page as headless chromium renders
it (not blank; the table sorts). The browser test skips when chromium is not installed."""

from __future__ import annotations

import html.parser
import io
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesionseg.metrics import scores
from lesionseg.quality import review_summary
from lesionseg.report import ISIC_FAILURE_JACCARD, error_type, write_report

N = 1000


def _rows(n: int, seed: int = 0) -> list[dict]:
    """n scored rows with realistic counts (scores from lesionseg.metrics) and 3 without truth,
    one of them an empty prediction."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = int(rng.integers(100, 400)), int(rng.integers(100, 400))
        area = int(h * w * rng.uniform(0.005, 0.6))
        tp = int(area * rng.uniform(0.2, 1.0))
        fn, fp = area - tp, int(area * rng.uniform(0, 0.6))
        tn = h * w - tp - fn - fp
        rows.append({"id": f"ISIC_{i:07d}", "height": h, "width": w, "tp": tp, "fp": fp,
                     "fn": fn, "tn": tn, "status": "ok", "reason": "", "input": f"/data/ISIC_{i:07d}.jpg",
                     "mask": f"masks/ISIC_{i:07d}_Segmentation.png", "pred_area": tp + fp,
                     "pred_fraction": (tp + fp) / (h * w), "split": "test"})
    if rows:
        counts = torch.tensor([[r["tp"], r["fp"], r["fn"], r["tn"]] for r in rows])
        per = {k: v.tolist() for k, v in scores(counts).items()}
        for i, r in enumerate(rows):
            r.update({k: per[k][i] for k in per}, iou=per["jaccard"][i])
    for j, frac in enumerate((0.0, 0.02, 0.31)):
        rows.append({"id": f"photo_{j}", "height": 100, "width": 100, "status": "no_truth",
                     "reason": "", "input": f"/data/photos/p{j}.jpg", "pred_area": int(frac * 1e4),
                     "pred_fraction": frac, "mask": f"masks/photo_{j}_Segmentation.png"})
    return rows


def _summary(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["status"] == "ok"] or [{k: 0.0 for k in (
        "dice", "jaccard", "threshold_jaccard", "accuracy", "sensitivity", "specificity")}]
    return {
        "complete": True, "images_found": len(rows) + 1, "masks_written": len(rows),
        "scored": len(scored), "without_truth": len(rows) - len(scored), "errors": 1,
        "means": {k: float(np.mean([r[k] for r in scored])) for k in
                  ("dice", "jaccard", "threshold_jaccard", "accuracy", "sensitivity", "specificity")},
        "failures": [{"id": "broken", "input": "/data/broken.jpg", "reason": "empty file"}],
        "threshold": 0.42, "postprocess": "largest+fill", "device": "cuda", "precision": "bf16",
        "inputs": ["/data"],
        "checkpoint": {"path": "/runs/isic/best.pt", "sha256": "ab" * 32,
                       "meta": {"step": 1200, "val": {"dice": 0.91}, "best_metric": "dice"}},
        "config": {"infer": {"tta": True, "image_size": 384, "threshold": 0.5, "report_images": 40,
                             "mixed_precision": "auto"}},
        "throughput": {"images_per_s": 55.5},
    }


def _thumbs(folder: Path, ids: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in ids:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        (folder / f"{i}.jpg").write_bytes(buf.getvalue())
    return folder


class _Table(html.parser.HTMLParser):
    """The per-image table's header keys and cell texts / data-v values, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.keys, self.rows, self.links = [], [], []
        self._in, self._cell, self._row = False, None, None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id") == "images":
            self._in = True
        if not self._in:
            return
        if tag == "th":
            self.keys.append(a.get("data-key"))
        elif tag == "tr" and self.keys:
            self._row = []
        elif tag == "td":
            self._cell = {"v": a.get("data-v"), "text": ""}
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._in:
            self._in = False
        elif tag == "td" and self._cell is not None and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row:
            self.rows.append(dict(zip(self.keys, self._row, strict=True)))
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data


def _table(page: str) -> _Table:
    t = _Table()
    t.feed(page)
    return t


def test_report_html_for_a_thousand_images(tmp_path: Path) -> None:
    rows = _rows(N)
    summary = _summary(rows)
    thumbs = _thumbs(tmp_path / "thumbs", [r["id"] for r in rows])
    start = time.perf_counter()
    path = write_report(tmp_path / "report.html", summary, rows, thumbs)
    seconds = time.perf_counter() - start
    page = path.read_text()
    assert seconds < 5, f"{seconds:.1f} s to write the report"
    assert len(page) < 3_000_000, len(page)  # opens fast: table rows plus <= 40 thumbnails

    # Self-contained: nothing is fetched.
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    assert "@import" not in page and "url(http" not in page
    assert page.count("data:image/jpeg;base64,") <= 40

    # Every setting summary.json carries, top level first (threshold 0.42, not the config's 0.5).
    for text in ("/runs/isic/best.pt", "ab" * 32, "step 1200, val dice 0.9100", "0.4200",
                 "largest+fill", ">cuda<", ">bf16<", ">384<", ">true<"):
        assert text in page, text
    assert ">0.5000<" not in page.split("<h2>Counts")[0]

    # Median and IQR beside the means; the number below the ISIC failure line.
    scored = [r for r in rows if r["status"] == "ok"]
    dice = np.array([r["dice"] for r in scored])
    q1, med, q3 = np.percentile(dice, [25, 50, 75])
    assert f"<td class=\"n\">{med:.4f}</td><td class=\"n\">{q1:.4f}–{q3:.4f}</td>" in page
    below = sum(r["jaccard"] < ISIC_FAILURE_JACCARD for r in scored)
    assert f"<b>{below}</b> of {N} images" in page and 0 < below < N
    fp_below = sum(error_type(r) == "FP" for r in scored if r["jaccard"] < ISIC_FAILURE_JACCARD)
    assert re.search(rf"false positives \(over-segmented\)</th><td class=\"n\">{fp_below}</td>", page)

    # Charts: the histogram has a y axis; Dice vs size has one dot per scored image.
    assert 'aria-label="histogram of Dice"' in page and ">images</text>" in page
    assert page.count("<circle") == N

    # Worst and best cases: the gallery headers and their first card.
    worst = min(scored, key=lambda r: (r["dice"], r["id"]))
    best = max(scored, key=lambda r: (r["dice"], r["id"]))
    assert "Worst 8 by Dice" in page and "Best 8 by Dice" in page  # 40 cards: 5 galleries
    assert page.index(f'alt="{worst["id"]}"') < page.index("Best 8 by Dice") < page.index(
        f'alt="{best["id"]}"')
    assert "Most over-segmented" in page and "Most under-segmented" in page

    # The table: one row per image, links to its overlay, mask and input; errors.csv linked.
    table = _table(page)
    assert len(table.rows) == len(rows)
    assert {"id", "dice", "jaccard", "lesion", "predicted", "fp", "fn", "error", "mask",
            "input", "split"} <= set(table.keys)
    first = table.rows[0]
    assert float(first["dice"]["v"]) == pytest.approx(rows[0]["dice"])
    assert "thumbs/ISIC_0000000.jpg" in table.links
    assert "masks/ISIC_0000000_Segmentation.png" in table.links
    assert 'href="errors.csv"' in page
    empty = next(r for r in table.rows if r["id"]["text"] == "photo_0")
    assert "empty" in empty["predicted"]["text"]


def test_report_without_truth_shows_the_predictions(tmp_path: Path) -> None:
    rows = _rows(0)  # three photos without truth, one empty prediction
    summary = {**_summary(rows), "scored": 0, "means": {}, "failures": [], "errors": 0}
    thumbs = _thumbs(tmp_path / "thumbs", [r["id"] for r in rows])
    page = write_report(tmp_path / "report.html", summary, rows, thumbs).read_text()
    assert "None" not in page and "Scores (" not in page
    assert "Predictions without truth (3 images)" in page
    assert "1 empty prediction" in page and "The model found no lesion" in page
    # Largest predicted lesion first, and the empty one flagged in its own gallery.
    assert page.index('alt="photo_2"') < page.index('alt="photo_1"')
    assert page.count("data:image/jpeg;base64,") == 3
    assert len(_table(page).rows) == 3


def test_review_section_names_the_failures_the_flags_missed(tmp_path: Path) -> None:
    """With truth, the review section shows the images below Dice 0.8 that are not flagged,
    worst first, after the flagged ones; a flagged failure is not among them."""
    rows = [r for r in _rows(60) if r["status"] == "ok"]
    for i, r in enumerate(rows):
        r.update(uncertainty=0.01 * (i % 7), expected_dice=0.9, needs_review=i % 3 == 0)
    summary = {**_summary(rows), "review": review_summary(rows, {"level": 0.8})}
    thumbs = _thumbs(tmp_path / "thumbs", [r["id"] for r in rows])
    page = write_report(tmp_path / "report.html", summary, rows, thumbs).read_text()
    missed = sorted((r for r in rows if r["dice"] < 0.8 and not r["needs_review"]),
                    key=lambda r: r["dice"])
    failures = sum(r["dice"] < 0.8 for r in rows)
    assert missed and len(missed) < failures  # the flags caught some and missed some
    head = f"Missed by the flags ({len(missed)} of {failures} images with Dice below 0.8)"
    assert head in page
    section = page[page.index(head):page.index("<h2>", page.index(head))]
    shown = [r["id"] for r in missed][:40]  # the summary's report_images
    assert [section.index(f'alt="{i}"') for i in shown] == sorted(
        section.index(f'alt="{i}"') for i in shown)
    assert not any(f'alt="{r["id"]}"' in section for r in rows if r["needs_review"])
    assert [m["id"] for m in summary["review"]["with_truth"]["failures_missed"]] == [
        r["id"] for r in missed][:20]


def test_review_card_says_when_the_mask_is_the_empty_mask_fallback(tmp_path: Path) -> None:
    """A mask the fallback drew is flagged with a sure, low uncertainty: its card says that
    the model found no lesion, the other flagged cards do not, and the page's rule names it."""
    from lesionseg.postprocess import FALLBACK_NOTE

    rows = [r for r in _rows(12) if r["status"] == "ok"]
    for i, r in enumerate(rows):
        r.update(uncertainty=0.01 * i, expected_dice=0.9, needs_review=i in (0, 5),
                 reason=FALLBACK_NOTE if i == 0 else "")
    summary = {**_summary(rows), "review": review_summary(rows, {"level": 0.8})}
    thumbs = _thumbs(tmp_path / "thumbs", [r["id"] for r in rows])
    page = write_report(tmp_path / "report.html", summary, rows, thumbs).read_text()
    head = page.index("Review these first (2 of")
    section = page[head:page.index("<h2>", head + 1)]
    assert "or no pixel above the threshold" in section
    cards = section.split("<h3>")[0].split('<div class="card">')[1:]  # not the missed ones
    assert len(cards) == 2 and f'alt="{rows[5]["id"]}"' in cards[0]  # most uncertain first
    assert "no lesion found" in cards[1] and "no lesion found" not in cards[0]


# --------------------------------------------------------------------------- in a browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(args: list[str], url: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--no-first-run",
             f"--user-data-dir={profile}", *args, url],
            capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (CI installs it)")
def test_report_renders_and_sorts_in_chromium(tmp_path: Path) -> None:
    rows = _rows(200)
    thumbs = _thumbs(tmp_path / "thumbs", [r["id"] for r in rows])
    path = write_report(tmp_path / "report.html", _summary(rows), rows, thumbs)
    shot = tmp_path / "shot.png"
    r = _browser([f"--screenshot={shot}", "--window-size=1400,2000"], path.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1400)
    assert img.std() > 20, "the screenshot is (nearly) blank"
    colours = np.unique(img.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 200, "text, charts and thumbnails should give many colours"

    # The script sorts in a real browser: #sort=dice:desc orders the rows by Dice, blanks last.
    for key, desc in (("dice", True), ("predicted", False), ("id", True)):
        r = _browser(["--dump-dom"], f"{path.as_uri()}#sort={key}:{'desc' if desc else 'asc'}")
        assert r.returncode == 0, r.stderr[-2000:]
        table = _table(r.stdout)
        assert len(table.rows) == len(rows)
        if key == "id":
            ids = [row["id"]["text"] for row in table.rows]
            assert ids == sorted(ids, key=str.lower, reverse=True)
            continue
        values = [row[key]["v"] for row in table.rows]
        numbers = [float(v) for v in values if v]
        assert numbers == sorted(numbers, reverse=desc) and numbers != sorted(numbers, reverse=not desc)
        assert all(not v for v in values[len(numbers):]), "blank cells sort last"
