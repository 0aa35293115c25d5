"""lesionseg.inference end to end on tiny synthetic data: every input kind, parts + merge,
resume after a kill, bad inputs, the job script and a 2-process accelerate run."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesionseg import inference
from lesionseg.checkpoint import load_weights, save_weights
from lesionseg.cli import main
from lesionseg.config import PackConfig, load_config
from lesionseg.data.images import load_image
from lesionseg.data.shards import pack
from lesionseg.data.synthetic import write_isic_dataset
from lesionseg.data.transforms import eval_transform, stack_images, to_float_images
from lesionseg.infer import finish as finishing
from lesionseg.infer import loader
from lesionseg.inference import cpu_has_bf16
from lesionseg.metrics import confusion_counts, scores
from lesionseg.model import MobileNetEncoderDecoder
from lesionseg.postprocess import Postprocess

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
IMAGE_SIZE = 64
N_CASES = 6
TRAIN_DIR = "ISBI2016_ISIC_Part1_Training_Data"
TRUTH_DIR = "ISBI2016_ISIC_Part1_Training_GroundTruth"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six synthetic ISIC cases (≤ 160 px) and a random model whose head bias is shifted so
    that its masks are neither empty nor full (a test of identical masks must mean something)."""
    root = tmp_path_factory.mktemp("infer")
    isic = write_isic_dataset(root / "isic", N_CASES, seed=3, min_side=48, max_side=160)
    torch.manual_seed(0)
    model = MobileNetEncoderDecoder().eval()
    images = sorted((isic / TRAIN_DIR).glob("*.jpg"))
    batch = to_float_images(stack_images([
        eval_transform(load_image(p.read_bytes())[0], None, IMAGE_SIZE)[0] for p in images]))
    with torch.no_grad():
        model.decoder.head.bias -= model(batch).median()
    cfg = load_config(None, ["model.encoder_weights=null", f"data.image_size={IMAGE_SIZE}"])
    ckpt = save_weights(root / "best.pt", model.state_dict(), cfg)
    return {"root": root, "isic": isic, "images": isic / TRAIN_DIR, "truth": isic / TRUTH_DIR,
            "ckpt": ckpt}


def infer(data: dict[str, Path], out: Path, *inputs: Path | str, extra: tuple[str, ...] = ()) -> int:
    """Run the infer command in this process, as `jobs/infer.py` would."""
    argv = ["infer", "--checkpoint", str(data["ckpt"]), "--out", str(out), "--workers", "0",
            "--batch-size", "2"]
    for p in inputs:
        argv += ["--input", str(p)]
    # The fixtures' ISIC data is mostly training data: every split, unless a test chooses.
    if not any("splits" in e for e in extra):
        argv += ["--splits", "train,val,test"]
    # One torch thread: on 2 cores busy with other work, 2 threads run ~10x slower. Overrides
    # go last (argparse takes key=value items as one group).
    return main(argv + list(extra) + ["infer.num_threads=1"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mask_arrays(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "masks").iterdir())}


def test_input_kinds_give_identical_masks_and_scores(data: dict[str, Path], tmp_path: Path) -> None:
    images, truth = data["images"], data["truth"]
    zpath, tpath = tmp_path / "cases.zip", tmp_path / "cases.tar.gz"
    with zipfile.ZipFile(zpath, "w") as zf, tarfile.open(tpath, "w:gz") as tf:
        for p in sorted(images.glob("*.jpg")):
            zf.write(p, f"imgs/{p.name}")
            tf.add(p, f"imgs/{p.name}")
    shards = tmp_path / "shards"
    pack([data["isic"]], shards, PackConfig(max_side=0, workers=1, val_fraction=0.3), progress=False)

    runs = {"folder": (data["isic"],), "zip": (zpath, "--masks", truth),
            "tar": (tpath, "--masks", truth), "shards": (shards, "infer.splits=[train,val]")}
    results = {}
    for name, (src, *masks) in runs.items():
        out = tmp_path / f"out-{name}"
        assert infer(data, out, src, extra=tuple(str(m) for m in masks)) == 0
        results[name] = (mask_arrays(out), read_csv(out / "metrics.csv"))

    ref_masks, ref_rows = results["folder"]
    assert len(ref_masks) == N_CASES and len(ref_rows) == N_CASES
    fractions = [float((m > 0).mean()) for m in ref_masks.values()]
    assert 0 < np.mean(fractions) < 1, "the test model should predict some lesion and background"
    for name, (masks, rows) in results.items():
        assert masks.keys() == ref_masks.keys(), name
        for key, mask in masks.items():
            assert np.array_equal(mask, ref_masks[key]), f"{name}: {key} differs from the folder run"
        strip = [{k: v for k, v in r.items() if k not in ("input", "split")} for r in rows]
        assert strip == [{k: v for k, v in r.items() if k not in ("input", "split")}
                         for r in ref_rows], name

    # Masks: original size, mode L, 0/255 only, and nothing but masks in masks/.
    out = tmp_path / "out-folder"
    for row in ref_rows:
        mask = Image.open(out / "masks" / f"{row['id']}_Segmentation.png")
        original = Image.open(images / f"{row['id']}.jpg")
        assert mask.mode == "L" and mask.size == original.size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert all(p.name.endswith("_Segmentation.png") for p in (out / "masks").iterdir())

    # metrics.csv agrees with lesionseg.metrics computed on the written masks.
    for row in ref_rows:
        pred = torch.from_numpy(np.array(Image.open(out / "masks" / f"{row['id']}_Segmentation.png")))
        gt = torch.from_numpy(np.array(Image.open(truth / f"{row['id']}_Segmentation.png")))
        counts = confusion_counts(pred, gt)
        expect = {k: float(v[0]) for k, v in scores(counts).items()}
        assert [int(row[k]) for k in ("tp", "fp", "fn", "tn")] == counts[0].tolist()
        for name in ("dice", "accuracy", "sensitivity", "specificity", "threshold_jaccard"):
            assert float(row[name]) == pytest.approx(expect[name], abs=1e-12)
        assert float(row["iou"]) == pytest.approx(expect["jaccard"], abs=1e-12)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["scored"] == N_CASES and summary["errors"] == 0
    assert summary["checkpoint"]["sha256"] and summary["config"]["infer"]["image_size"] == IMAGE_SIZE
    assert summary["means"]["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in ref_rows]))
    html = (out / "report.html").read_text()
    cases = html[html.index("<h2>Cases</h2>"):]  # the galleries (flagged images come before)
    assert "<svg" in html and cases.count("data:image/jpeg;base64,") == N_CASES


def test_every_photo_gets_its_own_traceable_mask(data: dict[str, Path], tmp_path: Path) -> None:
    """Camera names repeating across folders, and names in other scripts: every image gets
    its own mask, named after its folders and letters; metrics.csv maps input → mask (no truth)."""
    photos = tmp_path / "photos"
    jpgs = sorted(data["images"].glob("*.jpg"))
    for i, sub in enumerate(("patient1", "patient2")):
        (photos / sub).mkdir(parents=True)
        shutil.copy(jpgs[i], photos / sub / "IMG_0001.JPG")
        shutil.copy(jpgs[i + 2], photos / sub / "IMG_0002.JPG")
    shutil.copy(jpgs[4], photos / "病变 ü.jpg")
    out = tmp_path / "out"
    assert infer(data, out, photos, extra=("--no-report",)) == 0
    assert read_csv(out / "errors.csv") == []
    rows = read_csv(out / "metrics.csv")
    mapping = {Path(r["input"]).relative_to(photos).as_posix(): r["mask"] for r in rows}
    assert mapping == {
        "patient1/IMG_0001.JPG": "masks/patient1__IMG_0001_Segmentation.png",
        "patient1/IMG_0002.JPG": "masks/patient1__IMG_0002_Segmentation.png",
        "patient2/IMG_0001.JPG": "masks/patient2__IMG_0001_Segmentation.png",
        "patient2/IMG_0002.JPG": "masks/patient2__IMG_0002_Segmentation.png",
        "病变 ü.jpg": "masks/病变_ü_Segmentation.png"}
    for r in rows:
        assert r["status"] == "no_truth"
        assert Image.open(out / r["mask"]).size == Image.open(r["input"]).size
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(
        Path(m).name for m in mapping.values())


def test_without_truth_rows_and_report_show_the_predictions(data: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """Photos without masks: a metrics.csv row per image with the predicted lesion area and
    fraction (as in the written mask), and a report of the predictions, not an empty grid."""
    out = tmp_path / "out"
    assert infer(data, out, data["images"]) == 0
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == N_CASES and {r["status"] for r in rows} == {"no_truth"}
    for r in rows:
        mask = np.asarray(Image.open(out / r["mask"]))
        assert int(r["pred_area"]) == int((mask > 0).sum())
        assert float(r["pred_fraction"]) == pytest.approx((mask > 0).mean(), abs=1e-6)
        assert r["dice"] == ""
    page = (out / "report.html").read_text()
    assert f"Predictions without truth ({N_CASES} images)" in page and "None" not in page
    cases = page[page.index("<h2>Cases</h2>"):]  # the galleries (flagged images come before)
    assert cases.count("data:image/jpeg;base64,") == N_CASES
    largest = max(rows, key=lambda r: (float(r["pred_fraction"]), r["id"]))
    assert cases.index(f'alt="{largest["id"]}"') == min(cases.index(f'alt="{r["id"]}"') for r in rows)


def test_official_zips_equal_the_isic_root(data: dict[str, Path], isic_root: Path,
                                           isic_zips: Path, tmp_path: Path) -> None:
    """The four official zips, read in place (train and test, images and truth), give the same
    masks and metrics as the unpacked ISIC root (shared conftest fixtures, 20 cases)."""
    zips = sorted(isic_zips.rglob("*.zip"))
    assert len(zips) == 4
    a, b = tmp_path / "root", tmp_path / "zips"
    assert infer(data, a, isic_root, extra=("--no-report",)) == 0
    assert infer(data, b, *zips, extra=("--no-report",)) == 0
    rows_a, rows_b = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    assert len(rows_a) == 20
    strip = [{k: v for k, v in r.items() if k != "input"} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k != "input"} for r in rows_b]
    masks_a, masks_b = mask_arrays(a), mask_arrays(b)
    assert masks_a.keys() == masks_b.keys()
    assert all(np.array_equal(masks_a[k], masks_b[k]) for k in masks_a)


def _without_input(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "input"} for r in rows]


def test_isic_root_and_zips_score_the_test_split_with_per_split_means(
        data: dict[str, Path], isic_root: Path, isic_zips: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """An ISIC root (16 training, 4 test cases) scored 20 images as one mean: now its test
    split only, said in one log line; every row names its split; a choice of more splits
    gives each split's means and names the pooled mean as such."""
    with caplog.at_level("INFO", logger="lesionseg"):
        assert infer(data, tmp_path / "root", isic_root, extra=("--splits", "")) == 0
    lines = [r.getMessage() for r in caplog.records if "scoring the test split only" in r.getMessage()]
    assert len(lines) == 1 and "16 train images left out" in lines[0], lines
    rows = read_csv(tmp_path / "root" / "metrics.csv")
    assert len(rows) == 4 and {r["split"] for r in rows} == {"test"}
    summary = json.loads((tmp_path / "root" / "summary.json").read_text())
    assert summary["means_splits"] == ["test"] and "means_note" not in summary
    assert summary["left_out_by_split"] == {"train": 16}
    assert summary["means_by_split"]["test"]["dice"] == pytest.approx(summary["means"]["dice"])
    assert "Scores (4 images, test split)" in (tmp_path / "root" / "report.html").read_text()
    # The official zips, given one by one or as their folder: the same four test images.
    for name, inputs in (("zips", sorted(isic_zips.rglob("*.zip"))), ("zipdir", [isic_zips])):
        assert infer(data, tmp_path / name, *inputs, extra=("--splits", "", "--no-report")) == 0
        assert _without_input(read_csv(tmp_path / name / "metrics.csv")) == _without_input(rows)
    # --splits train,test: both, each with its own means; the pooled mean says it pools.
    assert infer(data, tmp_path / "both", isic_root, extra=("--splits", "train,test")) == 0
    rows = read_csv(tmp_path / "both" / "metrics.csv")
    assert sorted(r["split"] for r in rows) == ["test"] * 4 + ["train"] * 16
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert set(summary["means_by_split"]) == {"train", "test"}
    assert summary["means_by_split"]["train"]["images"] == 16
    assert "pool the test and train splits" in summary["means_note"]
    page = (tmp_path / "both" / "report.html").read_text()
    assert "pooled over the test and train splits" in page and "Per split" in page
    # The training folder alone holds no test split: refused, naming the setting.
    assert infer(data, tmp_path / "train", isic_root / TRAIN_DIR, extra=("--splits", "")) == 2
    assert not (tmp_path / "train").exists()


def test_a_mistyped_input_masks_or_checkpoint_leaves_out_free(
        data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A typo wrote parts/signature.json before the input was checked, so the corrected
    command was refused ("holds a run with different inputs"). Now nothing is written under
    --out before inputs, truth and checkpoint are known good."""
    out = tmp_path / "out"
    assert infer(data, out, tmp_path / "no-such-folder") == 2
    assert "input does not exist" in capsys.readouterr().err
    assert not out.exists()
    assert infer(data, out, data["images"], extra=("--masks", str(tmp_path / "no-truth"))) == 2
    assert not out.exists()
    assert main(["infer", "--checkpoint", str(tmp_path / "typo.pt"), "--input",
                 str(data["images"]), "--splits", "train", "--out", str(out)]) == 2
    assert not out.exists()
    out.mkdir()  # an existing, empty --out stays empty
    assert infer(data, out, tmp_path / "no-such-folder") == 2
    assert list(out.iterdir()) == []
    assert infer(data, out, data["images"], extra=("--no-report",)) == 0
    assert len(read_csv(out / "metrics.csv")) == N_CASES


class RedLogit(torch.nn.Module):
    """A per-pixel model (logit = 10·red − 5): flip-equivariant, so TTA must change nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * 10 - 5


def test_tta_flips_back_exactly() -> None:
    x = torch.rand(3, 3, 40, 56)
    plain = inference.Predictor(RedLogit(), torch.device("cpu"), None, tta=False)(x)
    tta = inference.Predictor(RedLogit(), torch.device("cpu"), None, tta=True)(x)
    assert plain.shape == (3, 40, 56)
    assert torch.allclose(plain, tta, atol=1e-6)
    assert torch.allclose(plain, torch.sigmoid(x[:, 0] * 10 - 5), atol=1e-6)


def test_tta_probs_and_bf16(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert infer(data, out, data["isic"], extra=("--tta", "--save-probs", "--no-report",
                                                 "infer.mixed_precision=bf16")) == 0
    for mask_path in sorted((out / "masks").iterdir()):
        image_id = mask_path.name[: -len("_Segmentation.png")]
        prob = np.asarray(Image.open(out / "probs" / f"{image_id}_prob.png"))
        mask = np.asarray(Image.open(mask_path))
        assert prob.shape == mask.shape == np.asarray(Image.open(data["images"] / f"{image_id}.jpg")).shape[:2]
        # The mask is the (unquantized) probability > 0.5; the PNG holds it rounded to 1/255.
        assert np.array_equal(mask[prob >= 129] > 0, np.ones((prob >= 129).sum(), bool))
        assert not mask[prob <= 126].any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["infer"]["tta"] and summary["config"]["infer"]["mixed_precision"] == "bf16"


def test_device_and_precision_are_said_and_recorded(data: dict[str, Path], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture,
                                                     capsys: pytest.CaptureFixture) -> None:
    one = sorted(data["images"].glob("*.jpg"))[0]
    auto = "bf16" if cpu_has_bf16() else "fp32"  # auto: bf16 where the CPU has it in hardware
    cases = (((), auto, "infer.mixed_precision=auto: "),
             (("infer.mixed_precision=no",), "fp32", "infer.mixed_precision=no"),
             (("infer.mixed_precision=bf16",), "bf16", "infer.mixed_precision=bf16"))
    for i, (extra, precision, reason) in enumerate(cases):
        caplog.clear()
        with caplog.at_level("INFO", logger="lesionseg"):
            assert infer(data, tmp_path / f"o{i}", one, extra=("--device", "cpu", *extra)) == 0
        assert f"inference on cpu, {precision} precision ({reason}" in caplog.text
        assert "threads: 1 torch thread(s)" in caplog.text  # the test's infer.num_threads=1
        summary = json.loads((tmp_path / f"o{i}" / "summary.json").read_text())
        assert (summary["device"], summary["precision"]) == ("cpu", precision)
        assert summary["precision_reason"].startswith(reason)
        assert summary["config"]["infer"]["device"] == "cpu"
        threads = summary["throughput"]["processes"][0]["threads"]
        assert (threads["torch_threads"], threads["decode_workers"]) == (1, 0)  # as the test set
        assert threads["finish_threads"] >= 1 and threads["cores"] >= 1
    capsys.readouterr()
    assert infer(data, tmp_path / "bad", one, extra=("--device", "tpu")) == 2
    assert "infer.device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert infer(data, tmp_path / "nocuda", one, extra=("--device", "cuda")) == 2
        assert "--device cuda: no CUDA device" in capsys.readouterr().err


def test_downscaled_shards_write_original_size(data: dict[str, Path], tmp_path: Path) -> None:
    shards = tmp_path / "small"
    pack([data["isic"]], shards, PackConfig(max_side=40, workers=1), progress=False)
    out = tmp_path / "out"
    assert infer(data, out, shards, extra=("--no-report", "infer.splits=[train,val]")) == 0
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == N_CASES and not (out / "report.html").exists()
    for row in rows:
        size = Image.open(data["images"] / f"{row['id']}.jpg").size
        assert Image.open(out / "masks" / f"{row['id']}_Segmentation.png").size == size
        if max(size) > 40:
            assert row["status"] == "ok" and "truth resized" in row["reason"]


def test_shard_folder_reads_its_test_split_by_default(data: dict[str, Path], packed_shards: Path,
                                                     tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Scores over train and val mixed in would be optimistic: a shard folder gives its test
    split (val when it has none), the log and summary say which, metrics.csv has the split."""
    manifest = json.loads((packed_shards / "manifest.json").read_text())
    counts = {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")}
    assert all(counts.values())
    with caplog.at_level("INFO", logger="lesionseg"):
        assert infer(data, tmp_path / "default", packed_shards,
                     extra=("--no-report", "--splits", "")) == 0
    assert "scoring the test split only" in caplog.text
    rows = read_csv(tmp_path / "default" / "metrics.csv")
    assert len(rows) == counts["test"] and {r["split"] for r in rows} == {"test"}
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["splits_read"] == {str(packed_shards): ["test"]}
    # The pack's manifest.json stands for its folder.
    assert infer(data, tmp_path / "manifest", packed_shards / "manifest.json",
                 extra=("--no-report", "--splits", "")) == 0
    assert _without_input(read_csv(tmp_path / "manifest" / "metrics.csv")) == _without_input(rows)
    assert infer(data, tmp_path / "chosen", packed_shards,
                 extra=("--no-report", "infer.splits=[val,train]")) == 0
    rows = read_csv(tmp_path / "chosen" / "metrics.csv")
    assert sorted(r["split"] for r in rows) == ["train"] * counts["train"] + ["val"] * counts["val"]
    # Without a test split: val; with neither: refused, naming the key to set.
    no_test = tmp_path / "no_test"
    pack([data["isic"]], no_test, PackConfig(workers=1, val_fraction=0.3), progress=False)
    assert infer(data, tmp_path / "val", no_test, extra=("--no-report", "--splits", "")) == 0
    assert {r["split"] for r in read_csv(tmp_path / "val" / "metrics.csv")} == {"val"}
    train_only = tmp_path / "train_only"
    pack([data["isic"]], train_only, PackConfig(workers=1, val_fraction=0), progress=False)
    assert infer(data, tmp_path / "none", train_only, extra=("--no-report", "--splits", "")) == 2
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_decode_workers_and_finishing_threads_do_not_change_a_result(
        data: dict[str, Path], tmp_path: Path, worker_type: str) -> None:
    """Single images decoded by two decode threads (the CPU default) or two worker processes
    and stacked here, four finishing threads: the same rows and masks as one process doing
    everything in turn."""
    ref, par = tmp_path / "ref", tmp_path / "par"
    assert infer(data, ref, data["isic"], extra=("--no-report",)) == 0
    assert infer(data, par, data["isic"], extra=("--no-report", "--workers", "2",
                                                  "infer.post_threads=4",
                                                  f"infer.worker_type={worker_type}")) == 0
    assert (par / "metrics.csv").read_text() == (ref / "metrics.csv").read_text()
    assert mask_arrays(par).keys() == mask_arrays(ref).keys()
    assert all(np.array_equal(a, b) for a, b in zip(mask_arrays(par).values(),
                                                    mask_arrays(ref).values(), strict=True))
    threads = json.loads((par / "summary.json").read_text())["throughput"]["processes"][0]["threads"]
    assert (threads["decode_workers"], threads["finish_threads"]) == (2, 4)
    assert threads["worker_type"] == worker_type


def test_decode_threads_keep_order_bound_the_work_in_flight_and_stop_with_the_consumer() -> None:
    """The thread pool yields the samples in order, never has more than `ahead` submitted and
    not yet taken, and stops (no decode left running) when the consumer stops early."""
    import threading

    started: list[int] = []
    lock = threading.Lock()

    class Slow:
        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> dict:
            with lock:
                started.append(i)
            time.sleep(0.002 * (i % 3))  # out-of-order completion
            return {"index": i}

    gen = loader.decoded_in_threads(Slow(), 3, 4)
    taken = []
    for sample in gen:
        taken.append(sample["index"])
        with lock:
            assert len(started) <= len(taken) - 1 + 4  # at most `ahead` beyond what was taken
        if len(taken) == 10:
            break
    gen.close()
    assert taken == list(range(10))
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]
    assert max(started) < 14


def test_batched_keeps_order_and_failures() -> None:
    samples = [{"index": i, "image": torch.full((3, 4, 4), i, dtype=torch.uint8)} for i in range(5)]
    samples[2] = {"index": 2, "error": "bad"}
    batches = list(loader.batched(iter(samples), 2))
    assert [len(b["good"]) + len(b["failed"]) for b in batches] == [2, 2, 1]
    assert [s["index"] for b in batches for s in b["good"]] == [0, 1, 3, 4]
    assert batches[1]["failed"][0]["error"] == "bad" and batches[1]["images"].shape[0] == 1
    assert batches[2]["images"][0, 0, 0, 0] == 4


def test_two_parts_then_merge_equal_one_run(data: dict[str, Path], tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert infer(data, one, data["isic"], extra=("--save-overlays",)) == 0
    assert infer(data, two, data["isic"], extra=("--save-overlays", "--num-shards", "2",
                                                  "--shard-index", "1")) == 0
    assert not (two / "metrics.csv").exists()  # part 0 has not run: no merge yet
    assert infer(data, two, data["isic"], extra=("--save-overlays", "--num-shards", "2",
                                                  "--shard-index", "0")) == 0
    for name in ("metrics.csv", "errors.csv"):
        assert (two / name).read_text() == (one / name).read_text()
    assert mask_arrays(two).keys() == mask_arrays(one).keys()
    assert all(np.array_equal(a, b) for a, b in zip(mask_arrays(two).values(),
                                                    mask_arrays(one).values(), strict=True))
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["means"] == s2["means"] and s2["num_shards"] == 2 and s2["complete"]
    assert len(list((two / "overlays").glob("*_overlay.jpg"))) == N_CASES
    # --merge by hand is idempotent; another run's settings are refused in the same --out.
    assert main(["infer", "--merge", str(two)]) == 0
    assert (two / "metrics.csv").read_text() == (one / "metrics.csv").read_text()
    assert infer(data, two, data["isic"], extra=("--num-shards", "3")) == 2


class InjectedCrash(BaseException):
    """Stands for the process dying (not an Exception: no per-image handler may catch it)."""


def test_injected_crash_then_rerun_completes(data: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = inference.finish_item
    calls = {"n": 0}

    def crash_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise InjectedCrash("injected crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(finishing, "finish_item", crash_after_three)
    monkeypatch.setenv("LESIONSEG_TEST", "1")
    with pytest.raises(InjectedCrash, match="injected crash"):
        infer(data, out, data["isic"], extra=("infer.post_threads=1",))
    rows_file = next((out / "parts").glob("rows-*.jsonl"))
    assert 1 <= len(inference.read_rows(rows_file)) <= 3
    assert not (out / "metrics.csv").exists()
    monkeypatch.setattr(finishing, "finish_item", real)
    assert infer(data, out, data["isic"]) == 0
    ids = [r["id"] for r in inference.read_rows(rows_file)]
    assert len(ids) == len(set(ids)) == N_CASES
    assert len(read_csv(out / "metrics.csv")) == N_CASES


def test_job_script_killed_midway_then_rerun(data: dict[str, Path], tmp_path: Path) -> None:
    """`python jobs/infer.py` in a subprocess, SIGKILLed after its first rows; a torn last
    line is added as a kill mid-write would leave; the rerun finishes with no duplicates."""
    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):  # copies of the six cases under new ids, to give the kill some time
        src = sorted(data["images"].glob("*.jpg"))[i % N_CASES]
        shutil.copy(src, many / f"case{i:03d}.jpg")
    out = tmp_path / "out"
    cmd = [PY, str(REPO / "jobs" / "infer.py"), "--checkpoint", str(data["ckpt"]), "--input",
           str(many), "--out", str(out), "--workers", "0", "--batch-size", "1",
           "--image-size", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    rows_file = out / "parts" / "rows-p0000-r000.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if rows_file.exists() and len(inference.read_rows(rows_file)) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = len(inference.read_rows(rows_file))
    assert before < 40 and not (out / "metrics.csv").exists()
    with open(rows_file, "ab") as f:
        f.write(b'{"id": "case999", "status": "o')  # torn write
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [r["id"] for r in inference.read_rows(rows_file)]
    assert len(ids) == len(set(ids)) == 40
    assert rows_file.read_bytes().endswith(b"\n")
    assert len(list((out / "masks").iterdir())) == 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["masks_written"] == 40 and summary["without_truth"] == 40


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_decode_workers_die_with_a_killed_parent(data: dict[str, Path], tmp_path: Path) -> None:
    """kill -9 of the job left its DataLoader workers running as orphans (parent pid 1) for
    minutes; now the kernel kills them with the parent (PR_SET_PDEATHSIG)."""
    many = tmp_path / "many"
    many.mkdir()
    for i in range(60):
        shutil.copy(sorted(data["images"].glob("*.jpg"))[i % N_CASES], many / f"case{i:03d}.jpg")
    out = tmp_path / "out"
    cmd = [PY, str(REPO / "jobs" / "infer.py"), "--checkpoint", str(data["ckpt"]), "--input",
           str(many), "--out", str(out), "--workers", "2", "--batch-size", "1",
           "--image-size", "256", "infer.num_threads=1", "infer.worker_type=process"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    rows_file = out / "parts" / "rows-p0000-r000.jsonl"
    deadline = time.time() + 120
    workers: list[int] = []
    try:
        while time.time() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            if len(workers) >= 2 and rows_file.exists() and inference.read_rows(rows_file):
                break
            time.sleep(0.02)
        assert proc.poll() is None and len(workers) >= 2, "no decode workers seen"
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, as the OOM killer or a user would
        proc.wait()
        deadline = time.time() + 3  # PyTorch's own watchdog looks every 5 s, when idle
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "decode workers outlived their parent"
    finally:
        for w in workers:
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width×height pixels: enough for the bomb check, which reads headers."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_bad_inputs_are_recorded_and_the_batch_goes_on(data: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))  # 50 wide, 40 high
    folder = tmp_path / "bad"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: displayed 40 wide, 50 high
    good = _save(rgb, "JPEG")
    files = {
        "zero.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "text.png": b"this is not an image",
        "bomb.png": _png_header_only(30000, 30000),
        "rgba.png": _save(rgb.convert("RGBA"), "PNG"),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "gray.png": _save(rgb.convert("L"), "PNG"),
        "palette.png": _save(rgb.convert("P"), "PNG"),
        "deep.png": _save(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257), "PNG"),
        "rotated.jpg": _save(rgb, "JPEG", exif=exif.tobytes()),
        "wrongsize.jpg": good,
        "wrongsize_Segmentation.png": _save(Image.new("L", (30, 30), 255), "PNG"),
        "zeroone.jpg": good,
        "zeroone_Segmentation.png": _save(Image.new("L", (50, 40), 1), "PNG"),
        "rotated_Segmentation.png": _save(Image.new("L", (40, 50), 255), "PNG"),
        "notes.txt": b"skipped and counted",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    # Archive members with '..' and absolute names, in a zip and a tar.
    zpath, tpath = tmp_path / "evil.zip", tmp_path / "evil.tar"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("../../zipescape.jpg", good)
        zf.writestr("/abs/zipabs.jpg", good)
    with tarfile.open(tpath, "w") as tf:
        for name in ("../../tarescape.jpg", "/abs/tarabs.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(good)
            tf.addfile(info, io.BytesIO(good))
    out = tmp_path / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    assert infer(data, out, folder, zpath, tpath, extra=("--workers", "2")) == 0

    errors = {r["id"]: r["reason"] for r in read_csv(out / "errors.csv")}
    assert "empty file" in errors["zero"]
    assert "truncated" in errors["truncated"] or "corrupt" in errors["truncated"]
    assert "not an image" in errors["text"]
    assert "decompression bomb" in errors["bomb"]
    assert "truth unusable" in errors["wrongsize"] and "30x30" in errors["wrongsize"]
    assert set(errors) == {"zero", "truncated", "text", "bomb", "wrongsize"}

    masks = {p.name[: -len("_Segmentation.png")]: Image.open(p) for p in (out / "masks").iterdir()}
    for key in ("rgba", "cmyk", "gray", "palette", "deep", "wrongsize", "zeroone",
                "zipescape", "abs__zipabs", "tarescape", "abs__tarabs"):
        assert masks[key].size == (50, 40) and masks[key].mode == "L", key
    assert masks["rotated"].size == (40, 50)  # display orientation
    rows = {r["id"]: r for r in read_csv(out / "metrics.csv")}
    assert rows["wrongsize"]["status"] == "failed" and rows["wrongsize"]["dice"] == ""
    assert rows["zeroone"]["status"] == "ok" and int(rows["zeroone"]["fn"]) + int(rows["zeroone"]["tp"]) == 2000
    assert rows["rotated"]["status"] == "ok"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_files"] == {"not an image (by extension)": 1}
    [skipped] = summary["skipped_examples"]["not an image (by extension)"]
    assert skipped.endswith("notes.txt")  # named, so it can be found
    assert "notes.txt" in (out / "report.html").read_text()
    assert summary["errors"] == 5 and summary["masks_written"] == 12
    # Nothing was written outside --out.
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out or p in out.parents for p in created)


def test_one_pixel_image_and_any_per_image_exception_do_not_stop_the_batch(
        data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1x1 image gets its 1x1 mask (cv2.compare used to raise cv2.error on it, killing the
    run and every rerun); an exception of any type in one image's finishing step becomes that
    image's error row, and the run still merges, complete."""
    import cv2

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "dot.png").write_bytes(_save(Image.new("RGB", (1, 1), (200, 40, 40)), "PNG"))
    (folder / "dot_Segmentation.png").write_bytes(_save(Image.new("L", (1, 1), 255), "PNG"))
    for p in sorted(data["images"].glob("*.jpg"))[:3]:
        shutil.copy(p, folder / p.name)
    bad_id = sorted(data["images"].glob("*.jpg"))[1].stem
    real = inference.finish_item

    def finish(item, *args, **kwargs):
        if item.id == bad_id:
            raise cv2.error("injected: not among the errors anyone expected")
        return real(item, *args, **kwargs)

    monkeypatch.setattr(finishing, "finish_item", finish)
    out = tmp_path / "out"
    assert infer(data, out, folder) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["masks_written"] == 3 and summary["errors"] == 1, summary["failures"]
    errors = read_csv(out / "errors.csv")
    assert [e["id"] for e in errors] == [bad_id] and "error" in errors[0]["reason"]
    assert "injected" in errors[0]["reason"]
    dot = Image.open(out / "masks" / "dot_Segmentation.png")
    assert dot.size == (1, 1) and np.asarray(dot).item() in (0, 255)
    rows = {r["id"]: r for r in read_csv(out / "metrics.csv")}
    assert rows["dot"]["status"] == "ok" and int(rows["dot"]["tp"]) + int(rows["dot"]["fn"]) == 1


def test_tar_cut_short_by_a_damaged_header_is_in_errors_csv(data: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """tarfile ends a tar at a damaged header as if it were complete; the run must say so."""
    tpath = tmp_path / "cases.tar"
    with tarfile.open(tpath, "w") as tf:
        for p in sorted(data["images"].glob("*.jpg")):
            tf.add(p, p.name)
    with tarfile.open(tpath) as tf:
        fourth = tf.getmembers()[3].offset
    raw = bytearray(tpath.read_bytes())
    raw[fourth:fourth + 16] = b"\x8f" * 16
    tpath.write_bytes(bytes(raw))
    out = tmp_path / "out"
    assert infer(data, out, tpath) == 0
    errors = read_csv(out / "errors.csv")
    assert [e["input"] for e in errors] == [str(tpath)]
    assert "invalid tar header" in errors[0]["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["masks_written"] == 3 and summary["errors"] == 1


def _no_space(path: object = None) -> OSError:
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path else []))


@pytest.mark.parametrize("where", ["mask", "row"])
def test_disk_full_stops_in_one_line_and_the_rerun_retries(data: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture,
                                                           where: str) -> None:
    """No space left (while writing a mask, or appending a row): the run stops with one line,
    status 2, and no error row; once space is back the rerun does every image, 0 errors (it
    used to record "writing outputs failed" rows that every rerun treated as done, or exit 1)."""
    out = tmp_path / "out"
    calls = {"n": 0}
    if where == "mask":
        real = inference.write_mask

        def write_mask(path, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 2:
                raise _no_space(path)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(finishing, "write_mask", write_mask)
    else:
        real_fsync = os.fsync
        row_files: list[int] = []
        real_open = inference.RowLog.__init__

        def init(self, path):
            real_open(self, path)
            row_files.append(self.file.fileno())

        def fsync(fd):
            if fd in row_files:
                calls["n"] += 1
                if calls["n"] > 2:
                    raise _no_space()
            return real_fsync(fd)

        monkeypatch.setattr(inference.RowLog, "__init__", init)
        monkeypatch.setattr(os, "fsync", fsync)
    assert infer(data, out, data["isic"], extra=("infer.post_threads=1",)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in err[-1] and "rerun" in err[-1]
    assert "Traceback" not in "\n".join(err)
    rows = [r for p in (out / "parts").glob("rows-*.jsonl") for r in inference.read_rows(p)]
    assert 1 <= len(rows) < N_CASES and all(r["status"] == "ok" for r in rows)
    assert not (out / "summary.json").exists()
    monkeypatch.undo()
    assert infer(data, out, data["isic"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["scored"] == N_CASES and summary["errors"] == 0


def test_input_failures_are_final_unless_retry_failed(data: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = inference.finish_item
    bad_id = sorted(data["images"].glob("*.jpg"))[0].stem

    def finish(item, *args, **kwargs):
        if item.id == bad_id:
            raise ValueError("injected: this image's own failure")
        return real(item, *args, **kwargs)

    monkeypatch.setattr(finishing, "finish_item", finish)
    assert infer(data, out, data["isic"]) == 0
    monkeypatch.undo()
    assert infer(data, out, data["isic"]) == 0  # a plain rerun keeps the error: it is final
    assert [e["id"] for e in read_csv(out / "errors.csv")] == [bad_id]
    assert infer(data, out, data["isic"], extra=("--retry-failed",)) == 0
    assert read_csv(out / "errors.csv") == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == N_CASES and summary["errors"] == 0


def test_two_runs_racing_into_one_out_cannot_both_claim_it(tmp_path: Path) -> None:
    """The settings check read run.json, written later: two runs with different checkpoints
    that started together both passed it (and mixed masks and rows). Now the first run claims
    the folder exclusively; of two racing runs exactly one wins, every time."""
    import threading

    def signature(sha: str) -> dict:
        return {"num_shards": 1, "inputs": ["/in"], "masks": [], "checkpoint_sha256": sha,
                "image_size": 64, "threshold": 0.5, "postprocess": "none", "tta": False,
                "splits": [], "empty_fallback": 0.5, "refine": 0}

    for attempt in range(20):
        parts = tmp_path / f"out{attempt}" / "parts"
        parts.mkdir(parents=True)
        barrier, outcome = threading.Barrier(2), {}

        def run(sha: str, parts: Path = parts, barrier=barrier, outcome=outcome) -> None:
            barrier.wait()
            try:
                inference.check_signature(parts, signature(sha))
                outcome[sha] = "claimed"
            except inference.InferenceError as e:
                outcome[sha] = str(e)

        threads = [threading.Thread(target=run, args=(sha,)) for sha in ("aaa", "bbb")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(v == "claimed" for v in outcome.values()) == [False, True], outcome
        loser = next(v for v in outcome.values() if v != "claimed")
        assert "different checkpoint_sha256" in loser and "new --out" in loser
        inference.check_signature(parts, signature(next(k for k, v in outcome.items()
                                                         if v == "claimed")))  # resume: fine


@pytest.mark.slow
def test_two_identical_runs_into_one_out_do_the_work_once(data: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """Started together: whichever takes the part's lock first predicts every image; the
    other waits for it, then finds them all done (the compute is not doubled)."""
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "jobs" / "infer.py"), "--checkpoint", str(data["ckpt"]),
            "--out", str(out), "--input", str(data["images"]), "--splits", "train",
            "--workers", "0", "--batch-size", "2", "infer.num_threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    done = [int(m) for log in logs for m in re.findall(r"process 0/1: (\d+) images \(", log)]
    assert sorted(done) == [0, N_CASES], logs
    assert len(read_csv(out / "metrics.csv")) == N_CASES


def test_missing_arguments_and_bad_checkpoint_are_clear(data: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["infer", "--input", str(data["isic"])]) == 2
    assert "missing --checkpoint, --out" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    assert main(["infer", "--checkpoint", str(bad), "--input", str(data["isic"]),
                 "--splits", "train", "--out",
                 str(tmp_path / "o")]) == 2
    assert "bad.pt: not a lesionseg checkpoint" in capsys.readouterr().err
    # Files torch's weights-only loader refuses: its advice (weights_only=False) is never passed on.
    pickled, model_file = tmp_path / "pickled.pkl", tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04\x95" + bytes(range(256)) * 4)
    torch.save(torch.nn.Linear(2, 2), model_file)
    for path in (pickled, model_file):
        assert main(["infer", "--checkpoint", str(path), "--input", str(data["isic"]),
                     "--splits", "train", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"{path.name}: not a lesionseg checkpoint" in err and "weights_only" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    # Weights that do not fit the model its config describes: one line, status 2, no masks.
    wrong = save_weights(tmp_path / "wrong.pt", {"x": torch.zeros(1)},
                         load_weights(data["ckpt"])[1])
    assert main(["infer", "--checkpoint", str(wrong), "--input", str(data["isic"]),
                 "--splits", "train", "--out",
                 str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong.pt: weights do not fit" in err[0], err
    assert not (tmp_path / "w" / "masks").exists()
    # A run folder as --checkpoint: said to be a folder, with the file it probably meant.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(data["ckpt"], run_dir / "best.pt")
    assert main(["infer", "--checkpoint", str(run_dir), "--input", str(data["isic"]),
                 "--splits", "train", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and f"did you mean {run_dir / 'best.pt'}" in err
    assert "not found" not in err
    assert main(["infer", "--merge", str(tmp_path / "nothing")]) == 2
    capsys.readouterr()
    for out in (bad, bad / "sub"):  # --out an existing file, or below one: one line, status 2
        assert main(["infer", "--checkpoint", str(data["ckpt"]), "--input", str(data["isic"]),
                     "--splits", "train", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0] and "existing file" in err[0], err
    assert inference.job_part(None, None, {"SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_ID": "7",
                                            "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_STEP": "2"}) == (5, 2)
    assert inference.job_part(None, None, {}) == (1, 0)


def test_two_processes_with_accelerate_equal_one(data: dict[str, Path], tmp_path: Path) -> None:
    accelerate = Path(PY).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate launcher not installed next to this python")
    args = ["--checkpoint", str(data["ckpt"]), "--input", str(data["isic"]), "--workers", "1",
            "--batch-size", "1", "--no-report", "--splits", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    one = subprocess.run([PY, str(REPO / "jobs" / "infer.py"), *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "0",
                          str(REPO / "jobs" / "infer.py"), *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = sorted((tmp_path / "two" / "parts").glob("rows-*.jsonl"))
    assert [p.name for p in rows] == ["rows-p0000-r000.jsonl", "rows-p0000-r001.jsonl"]
    assert all(inference.read_rows(p) for p in rows)
    assert (tmp_path / "two" / "metrics.csv").read_text() == (tmp_path / "one" / "metrics.csv").read_text()
    assert all(np.array_equal(a, b) for a, b in zip(mask_arrays(tmp_path / "two").values(),
                                                    mask_arrays(tmp_path / "one").values(), strict=True))
    # The last word is the merge, not "part 0 still running" from the rank that finished first.
    logged = [line for line in two.stderr.splitlines() if " lesionseg." in line]
    assert f"merged {N_CASES} images" in logged[-1], logged[-3:]
    assert not any("not finished" in line or "still running" in line for line in logged)

    # `accelerate launch --cpu --num_processes 2` starts one process: the job relaunches as 2.
    cpu = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "2",
                          "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(REPO / "jobs" / "infer.py"), *args, "--out", str(tmp_path / "cpu")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    assert "relaunching as 2 CPU (gloo) ranks" in cpu.stderr
    rows = sorted((tmp_path / "cpu" / "parts").glob("rows-*.jsonl"))
    assert [p.name for p in rows] == ["rows-p0000-r000.jsonl", "rows-p0000-r001.jsonl"]
    assert (tmp_path / "cpu" / "metrics.csv").read_text() == (tmp_path / "one" / "metrics.csv").read_text()


def test_masks_folder_scores_the_same_in_the_official_isic_scorer(data: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """The masks/ folder goes to the official ISIC scorer as it is, and the scorer's macro means
    equal summary.json's (the scorer is in the [dev] extra; this is the contract's proof)."""
    scoring = pytest.importorskip("isic_challenge_scoring")
    out = tmp_path / "out"
    assert infer(data, out, data["images"], extra=("--masks", str(data["truth"]))) == 0
    official = scoring.SegmentationScore.from_dir(data["truth"], out / "masks").to_dict()
    ours = json.loads((out / "summary.json").read_text())["means"]
    assert ours["images"] == N_CASES
    for name in ("accuracy", "dice", "jaccard", "sensitivity", "specificity", "threshold_jaccard"):
        assert ours[name] == pytest.approx(official["macro_average"][name], abs=1e-12), name


# --------------------------------------------------------------------------- finish_item units


def test_truth_with_an_exif_orientation_scores_as_in_the_official_scorer(
        data: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A square truth PNG carrying EXIF orientation 6 (its image carries none): the scorer
    reads its pixels as stored; so do we (we used to rotate it: Dice 0.338 vs 0.770), with a
    warning and a note in the row."""
    scoring = pytest.importorskip("isic_challenge_scoring")
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    src = sorted(data["images"].glob("*.jpg"))[0]
    Image.open(src).convert("RGB").resize((64, 64)).save(images / "ISIC_0000100.jpg")
    arr = np.zeros((64, 64), np.uint8)
    arr[:, :20] = 255  # the left edge: rotating it by 90 degrees moves it to the top
    arr[40:, 30:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(truth / "ISIC_0000100_Segmentation.png", exif=exif.tobytes())
    assert Image.open(truth / "ISIC_0000100_Segmentation.png").getexif().get(0x0112) == 6
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert infer(data, out, images, extra=("--masks", str(truth))) == 0
    official = scoring.SegmentationScore.from_dir(truth, out / "masks").to_dict()
    row = read_csv(out / "metrics.csv")[0]
    for name in ("accuracy", "dice", "jaccard", "sensitivity", "specificity"):
        ours = float(row["iou" if name == "jaccard" else name])
        assert ours == pytest.approx(official["macro_average"][name], abs=1e-12), name
    assert row["status"] == "ok" and "EXIF orientation 6" in row["reason"]
    assert "EXIF orientation 6" in caplog.text


def _finish(tmp_path: Path, prob: torch.Tensor, size: tuple[int, int], threshold: float,
            truth: np.ndarray | None = None, preview: np.ndarray | None = None,
            save_probs: bool = False) -> tuple[dict, np.ndarray]:
    """Run finish_item on one hand-made sample; returns its row and the written mask."""
    from lesionseg.data.sources import Blob, Item

    item = Item(id="ISIC_0000001", image=Blob("file", str(tmp_path / "ISIC_0000001.jpg")))
    sample = {"size": size, "truth_bits": None if truth is None else np.packbits(truth > 0),
              "truth_error": None, "truth_note": "", "preview": preview}
    spec = inference.OutputSpec(tmp_path, Postprocess(threshold), save_probs,
                                preview is not None, preview is not None)
    row = inference.finish_item(item, sample, prob, spec)
    mask = Image.open(tmp_path / "masks" / "ISIC_0000001_Segmentation.png")
    assert mask.mode == "L" and mask.size == (size[1], size[0])
    arr = np.asarray(mask)
    assert set(np.unique(arr)) <= {0, 255}
    return row, arr


def test_an_empty_mask_is_written_as_its_most_confident_region_and_says_so(
        tmp_path: Path) -> None:
    """No pixel above the threshold and the fallback on: the written mask is the region above
    half the highest probability, scored as written, flagged for review, and the row's reason
    says why; off, the mask stays empty and the reason too."""
    from lesionseg.data.sources import Blob, Item
    from lesionseg.infer.finish import FALLBACK_NOTE

    prob = torch.zeros(32, 32)
    prob[8:16, 8:16] = 0.4
    truth = np.zeros((64, 64), np.uint8)
    truth[16:32, 16:32] = 1
    item = Item(id="ISIC_0000001", image=Blob("file", str(tmp_path / "ISIC_0000001.jpg")))
    sample = {"size": (64, 64), "truth_bits": np.packbits(truth > 0), "truth_error": None,
              "truth_note": "", "preview": None}
    for fallback in (0.5, 0.0):
        out = tmp_path / str(fallback)
        spec = inference.OutputSpec(out, Postprocess(0.5, fallback=fallback), False, False,
                                    False)
        row = inference.finish_item(item, sample, prob, spec)
        mask = np.asarray(Image.open(out / "masks" / "ISIC_0000001_Segmentation.png")) > 0
        if fallback:
            assert row["reason"] == FALLBACK_NOTE and row["pred_area"] == mask.sum() > 0
            assert row["needs_review"] is True
            assert row["tp"] == (mask & (truth > 0)).sum() > 0.8 * truth.sum()
        else:
            assert row["reason"] == "" and row["pred_area"] == 0 and not mask.any()


def _reference(prob: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The float path the job used before cv2: torch bilinear, pixel centres aligned."""
    import torch.nn.functional as F

    return F.interpolate(prob[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.99])
def test_finish_item_mask_is_probability_above_threshold(tmp_path: Path, threshold: float) -> None:
    """The mask is bilinear(prob) > threshold at the original size, as torch's float path gives
    it (pixels within 1e-5 of the threshold may go either way: float rounding), and the row's
    counts are those of the written mask against the truth."""
    g = torch.Generator().manual_seed(int(threshold * 100))
    low = torch.rand(1, 1, 6, 9, generator=g) * 1.2 - 0.1
    prob = torch.nn.functional.interpolate(low, size=(64, 64), mode="bicubic")[0, 0].clamp(0, 1)
    size = (301, 457)  # non-integer scales, h != w
    full = _reference(prob, size)
    truth = np.asarray(torch.rand(size, generator=g) > 0.5)
    row, mask = _finish(tmp_path, prob, size, threshold, truth=truth)
    expect = full > threshold
    assert 0 < expect.mean() < 1, "the map should cross the threshold"
    clear = np.abs(full - threshold) > 1e-5
    assert np.array_equal((mask > 0)[clear], expect[clear])
    assert ((mask > 0) != expect).sum() <= (~clear).sum()
    counts = confusion_counts(torch.from_numpy(mask.copy()), torch.from_numpy(truth))[0].tolist()
    assert row["status"] == "ok" and [row[k] for k in ("tp", "fp", "fn", "tn")] == counts
    assert (row["height"], row["width"]) == size


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.99, 1 / 3])
def test_finish_item_threshold_is_strict_at_float32(tmp_path: Path, threshold: float) -> None:
    """A map exactly at float32(threshold) is background; one float32 step above is lesion."""
    at = np.float32(threshold)
    for value, lesion in ((at, False), (np.nextafter(at, np.float32(1)), True),
                          (np.nextafter(at, np.float32(0)), False)):
        prob = torch.full((48, 48), float(value), dtype=torch.float32)
        row, mask = _finish(tmp_path, prob, (97, 131), threshold)
        assert (mask == (255 if lesion else 0)).all(), (threshold, value)
        assert row["status"] == "no_truth"


def test_finish_item_probs_and_previews(tmp_path: Path) -> None:
    """--save-probs holds round(prob * 255) of the upsampled map (±1 where float rounding
    lands on a tie); the overlay shows the prediction in red and the truth's outline in green."""
    g = torch.Generator().manual_seed(5)
    prob = torch.nn.functional.interpolate(torch.rand(1, 1, 5, 5, generator=g), size=(32, 32),
                                           mode="bilinear")[0, 0]
    size = (120, 200)
    truth = np.zeros(size, bool)
    truth[30:90, 50:150] = True
    preview = np.full((60, 100, 3), 128, np.uint8)
    _finish(tmp_path, prob, size, 0.5, truth=truth, preview=preview, save_probs=True)
    probs = np.asarray(Image.open(tmp_path / "probs" / "ISIC_0000001_prob.png")).astype(int)
    expect = np.round(_reference(prob, size) * 255).astype(int)
    assert probs.shape == size and np.abs(probs - expect).max() <= 1
    assert (probs != expect).mean() < 1e-3
    assert Image.open(tmp_path / "overlays" / "ISIC_0000001_overlay.jpg").size == (100, 60)
    assert Image.open(tmp_path / "thumbs" / "ISIC_0000001.jpg").size == (100, 60)


def test_render_overlay_outlines_prediction_and_truth() -> None:
    """Outlines, not fills: inside both masks the image shows through unchanged; the bands
    along each mask's edge (2 px here) are blue (prediction, on top) and yellow (truth)."""
    preview = np.full((20, 30, 3), 128, np.uint8)
    pred = np.zeros((200, 300), np.uint8)
    pred[:, :150] = 255  # left half: preview columns 0..14
    truth = np.zeros((200, 300), np.uint8)
    truth[50:150, 100:200] = 1  # preview rows 5..14, columns 10..19
    out = np.asarray(inference.render_overlay(preview, pred, truth))
    blue, yellow, grey = list(inference.PRED_RGB), list(inference.TRUTH_RGB), [128, 128, 128]
    assert out[0, 0].tolist() == grey and out[9, 5].tolist() == grey  # inside pred: not tinted
    assert out[9, 20].tolist() == grey and out[0, 29].tolist() == grey  # background
    for x in (13, 14):
        assert out[0, x].tolist() == blue, x  # the prediction's edge band, 2 px
    assert out[0, 12].tolist() == grey
    for y, x in ((5, 17), (6, 17), (14, 17), (9, 19), (9, 18)):
        assert out[y, x].tolist() == yellow, (y, x)  # the truth's edge band
    assert out[9, 16].tolist() == grey  # inside the truth, away from both edges
    assert out[5, 13].tolist() == blue  # where the two meet, the prediction is on top
    assert not (out == yellow).all(axis=-1)[:, :3].any()  # the image border is no outline


def test_decode_item_packs_the_truth_and_shrinks_the_preview(data: dict[str, Path]) -> None:
    from lesionseg.data.images import load_mask
    from lesionseg.data.sources import collect

    for item in collect([data["isic"]], splits=("train",)).items[:3]:
        sample = inference.decode_item(item, IMAGE_SIZE, 32)
        h, w = sample["size"]
        truth = np.asarray(load_mask(item.truth.read(), expected_size=(h, w)))
        bits = np.unpackbits(sample["truth_bits"], count=h * w).reshape(h, w)
        assert np.array_equal(bits, truth > 128) and sample["truth_error"] is None
        assert max(sample["preview"].shape[:2]) == min(32, max(h, w))
        assert sample["preview"].dtype == np.uint8 and sample["preview"].shape[2] == 3


def test_an_io_error_reading_an_input_stops_but_a_missing_file_is_its_row(
        data: dict[str, Path], tmp_path: Path) -> None:
    """EIO while reading an input is the machine's (stop, retried on rerun); a file that
    vanished or cannot be opened is that input's own failure (a row)."""
    import errno

    from lesionseg.data.sources import Blob, Item

    class FailingBlob(Blob):
        def read(self) -> bytes:
            code = errno.EIO if "eio" in self.path else errno.ENOENT
            raise OSError(code, os.strerror(code), self.path)

    ds = inference.ItemDataset([Item("a", FailingBlob("file", "/x/eio.jpg")),
                                Item("b", FailingBlob("file", "/x/gone.jpg"))], 64, 0)
    eio, gone = ds[0], ds[1]
    assert eio.get("environmental") and "Input/output error" in eio["error"]
    assert "rerun" in eio["error"]
    assert not gone.get("environmental") and "No such file" in gone["error"]


# --------------------------------------------------------------------------- ensembles


@pytest.fixture(scope="module")
def second_ckpt(data: dict[str, Path]) -> Path:
    """Another random model at the same size: an ensemble partner for data["ckpt"]."""
    torch.manual_seed(7)
    model = MobileNetEncoderDecoder().eval()
    cfg = load_config(None, ["model.encoder_weights=null", f"data.image_size={IMAGE_SIZE}"])
    return save_weights(data["root"] / "second" / "best.pt", model.state_dict(), cfg)


@pytest.mark.parametrize("tta", [False, True])
def test_ensemble_probabilities_are_the_mean_of_its_models(data: dict[str, Path],
                                                           second_ckpt: Path, tta: bool) -> None:
    icfg = load_config(None, [f"infer.tta={str(tta).lower()}"]).infer
    cpu = torch.device("cpu")
    one, _, _ = inference.load_predictor(data["ckpt"], icfg, cpu)
    two, _, _ = inference.load_predictor(second_ckpt, icfg, cpu)
    ensemble, _, _, size = inference.load_ensemble([data["ckpt"], second_ckpt], icfg, cpu)
    assert isinstance(ensemble, inference.Ensemble) and size == IMAGE_SIZE
    images = stack_images([eval_transform(load_image(p.read_bytes())[0], None, IMAGE_SIZE)[0]
                           for p in sorted(data["images"].glob("*.jpg"))[:3]])
    p1, p2 = one(images), two(images)
    assert not torch.allclose(p1, p2, atol=1e-3)  # two different models
    assert torch.allclose(ensemble(images), (p1 + p2) / 2, rtol=0, atol=1e-7)


def test_ensemble_run_names_its_members_resumes_and_splits(data: dict[str, Path],
                                                          second_ckpt: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from lesionseg.files import sha256_file

    members = ("--checkpoint", str(second_ckpt))
    one, two = tmp_path / "one", tmp_path / "two"
    assert infer(data, one, data["isic"], extra=members) == 0
    s1 = json.loads((one / "summary.json").read_text())
    assert [m["path"] for m in s1["checkpoint"]["members"]] == [str(data["ckpt"]), str(second_ckpt)]
    assert [m["sha256"] for m in s1["checkpoint"]["members"]] == [
        sha256_file(data["ckpt"]), sha256_file(second_ckpt)]
    assert "model 2 of 2" in (one / "report.html").read_text()
    # each model rated by its own flips: the row's uncertainty is the mean of the models'
    assert s1["review"]["uncertainty"].startswith("mean over the 2 models of each model's own")
    for row in (r for p in (one / "parts").glob("rows-*.jsonl") for r in inference.read_rows(p)):
        assert row["signals"]["members"] == 8 and len(row["signals"]["model_uncertainties"]) == 2
        assert row["uncertainty"] == pytest.approx(
            sum(row["signals"]["model_uncertainties"]) / 2, abs=1e-5)
    single = tmp_path / "single"
    assert infer(data, single, data["isic"]) == 0
    assert json.loads((single / "summary.json").read_text())["means"] != s1["means"]
    # Two job parts merge to the one run; a rerun has nothing left to do.
    for part in ("1", "0"):
        assert infer(data, two, data["isic"], extra=(*members, "--num-shards", "2",
                                                      "--shard-index", part)) == 0
    assert (two / "metrics.csv").read_text() == (one / "metrics.csv").read_text()
    rows = sum(len(inference.read_rows(p)) for p in (two / "parts").glob("rows-*.jsonl"))
    assert infer(data, two, data["isic"], extra=(*members, "--num-shards", "2",
                                                  "--shard-index", "0")) == 0
    assert sum(len(inference.read_rows(p)) for p in (two / "parts").glob("rows-*.jsonl")) == \
        rows == N_CASES
    # Another set of members is another run: refused in the same --out.
    assert infer(data, one, data["isic"]) == 2
    assert "different checkpoint_sha256" in capsys.readouterr().err
    assert infer(data, tmp_path / "twice", data["isic"], extra=("--checkpoint", str(data["ckpt"]))) == 2
    assert "given twice" in capsys.readouterr().err


def test_ensemble_of_models_trained_at_different_sizes_needs_image_size(
        data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state, cfg = torch.load(data["ckpt"], weights_only=True)["state_dict"], \
        load_config(None, ["model.encoder_weights=null", "data.image_size=96"])
    other = save_weights(tmp_path / "big" / "best.pt", state, cfg)
    extra = ("--checkpoint", str(other))
    assert infer(data, tmp_path / "o", data["isic"], extra=extra) == 2
    err = capsys.readouterr().err.strip()
    assert "different data.image_size" in err and "--image-size" in err and "\n" not in err
    assert infer(data, tmp_path / "o", data["isic"], extra=(*extra, "--image-size", "64")) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["config"]["infer"][
        "image_size"] == 64


def test_an_out_written_before_the_empty_fallback_resumes_only_without_it(tmp_path: Path) -> None:
    """A signature.json without `empty_fallback` was written by a run that left empty masks
    empty: resuming it with the fallback off is the same run, with it on is refused."""
    from lesionseg.infer.journal import SIGNATURE_FILE

    old = {"num_shards": 1, "inputs": ["/in"], "masks": [], "checkpoint_sha256": "a",
           "image_size": 64, "threshold": 0.5, "postprocess": "none", "tta": False,
           "splits": []}
    parts = tmp_path / "out" / "parts"
    parts.mkdir(parents=True)
    (parts / SIGNATURE_FILE).write_text(json.dumps(old) + "\n")
    inference.check_signature(parts, old | {"empty_fallback": 0.0, "refine": 0})
    with pytest.raises(inference.InferenceError, match="different empty_fallback"):
        inference.check_signature(parts, old | {"empty_fallback": 0.5, "refine": 0})
    # nor does it hold refined masks: resuming it with the second pass on is refused
    with pytest.raises(inference.InferenceError, match="different refine"):
        inference.check_signature(parts, old | {"empty_fallback": 0.0, "refine": 1.4142})
