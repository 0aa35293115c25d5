"""W&B tracking: run identity across requeues, overlay images, and an offline run's files.

The offline run's `.wandb` file is a LevelDB-style log of protobuf records (wandb 0.31 no
longer ships a Python reader), decoded here with the `Record` message wandb ships.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lesionseg.tracking import CONFIG_COPY, RUN_ID_FILE, overlay_image, run_identity

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32768  # LevelDB log block size used by wandb's transaction log
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path, wait_s: float = 60.0) -> Iterator[object]:
    """Every protobuf Record of an offline run's run-*.wandb file, once the file is complete.

    wandb-core buffers the transaction log's last 32 KiB block and writes it when the run's
    stream closes, which `run.finish()` only requests: read at once in the same process, the
    file can still lack its tail (history, summary, exit). So this waits, up to `wait_s`, for
    the exit record, which is written last: once it is on disk, every record before it is.
    """
    deadline = time.monotonic() + wait_s
    while True:
        records = _parse_wandb_log(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            yield from records
            return
        assert time.monotonic() < deadline, (
            f"{path}: no exit record after {wait_s:.0f} s (records: "
            f"{[r.WhichOneof('record_type') for r in records]}): the run never finished")
        time.sleep(0.1)


def _parse_wandb_log(path: Path) -> list[object]:
    """The records of a LevelDB-style log (32 KiB blocks, 7-byte chunk headers) as far as it
    is on disk; a chunk cut short by a write in progress ends the list."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            raw = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            raw = pending + chunk
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError:  # a block read while it was being written
            break
        records.append(record)
    return records


def history_rows(run_dir: Path) -> list[dict[str, object]]:
    """The logged history rows ({key: value}) of an offline run folder."""
    rows = []
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                         for i in record.history.item})
    return rows


def summary_values(run_dir: Path) -> dict[str, object]:
    """The run summary an offline run recorded (its summary records, last value wins)."""
    out: dict[str, object] = {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def test_run_identity_keeps_the_id_and_numbers_offline_segments(tmp_path):
    first = run_identity(tmp_path, "offline")
    base = (tmp_path / RUN_ID_FILE).read_text().strip()
    assert first == (base, base, 1)
    assert run_identity(tmp_path, "offline") == (f"{base}-2", base, 2)
    assert run_identity(tmp_path, "online") == (base, base, 3)  # online resumes the same run


def test_overlay_image_carries_prediction_and_truth_masks():
    image = torch.rand(3, 16, 20)
    pred = torch.zeros(1, 16, 20, dtype=torch.bool)
    pred[0, 4:8, 5:9] = True
    truth = torch.zeros(16, 20, dtype=torch.uint8)
    truth[3:9, 4:10] = 1
    img = overlay_image(image, pred, truth, "ISIC_0000001")
    assert set(img._masks) == {"prediction", "ground_truth"}
    assert img._masks["prediction"]._val["mask_data"].sum() == 16
    assert img._masks["ground_truth"]._val["class_labels"] == {0: "background", 1: "lesion"}


def _offline_train(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`jobs/train.py` on tiny settings with W&B offline into `out`; it must succeed."""
    args = [f"data.shards={shards}", "data.image_size=64", "data.batch_size=2",
            "data.num_workers=0", "model.encoder_weights=null", "train.num_threads=1",
            "tracking.backend=wandb", f"train.output_dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), *args], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_offline_run_holds_config_metrics_and_overlays(packed_shards, tmp_path):
    out = tmp_path / "run"
    _offline_train(packed_shards, out, "optim.max_steps=4", "train.val_every_steps=2",
                   "train.log_every_steps=1", "tracking.log_images=2")
    runs = [Path(p) for p in glob.glob(str(out / "wandb" / "offline-run-*"))]
    assert len(runs) == 1
    run = runs[0]
    run_id = (out / RUN_ID_FILE).read_text().strip()
    assert run.name.endswith(run_id)
    assert "optim" in (run / "files" / CONFIG_COPY).read_text()

    rows = history_rows(run)
    train_rows = [row for row in rows if "train/loss" in row]
    assert [row["_step"] for row in train_rows] == [1, 2, 3, 4]
    for key in ("train/loss_bce", "train/loss_dice", "train/loss_iou", "train/lr",
                "train/grad_norm", "train/images_per_s"):
        assert all(key in row for row in train_rows), key
    # Losses are named as losses: no train/dice (the Dice *loss*) beside val/dice (the score).
    assert not any(k in row for row in train_rows for k in ("train/dice", "train/bce", "train/iou"))
    assert all(row["optim/step"] == row["_step"] for row in train_rows)
    val_rows = [row for row in rows if "val/dice" in row]
    assert [row["_step"] for row in val_rows] == [2, 4]
    # Declared metrics: plotted against the optimizer step; the summary keeps the best val Dice.
    metrics = {rec.metric.name or rec.metric.glob_name: rec.metric
               for rec in wandb_records(next(run.glob("run-*.wandb")))
               if rec.WhichOneof("record_type") == "metric"}
    assert {"optim/step", "train/*", "val/*", "val/dice", "train/loss"} <= set(metrics)
    assert metrics["val/*"].step_metric == "optim/step" and metrics["val/dice"].summary.max
    summary = summary_values(run)
    assert summary["val/dice"] == {"max": max(row["val/dice"] for row in val_rows)}
    # What it ran on: in the run summary and in both checkpoints' meta.
    on = {"device": "cpu", "processes": 1, "precision": "no"}
    assert {k: summary[f"run/{k}"] for k in on} == on
    from lesionseg.checkpoint import load_weights
    assert all(load_weights(out / name)[2]["trained_on"] == on for name in ("best.pt", "last.pt"))
    overlays = [row for row in rows if "val/overlays/_type" in row]
    assert len(overlays) == 2 and all(row["val/overlays/count"] == 2 for row in overlays)
    masks = overlays[0]["val/overlays/all_masks"]
    assert all(set(m) == {"prediction", "ground_truth"} for m in masks)
    for row in overlays:  # every image and mask file a row refers to was written
        files = row["val/overlays/filenames"] + [
            m[kind]["path"] for m in row["val/overlays/all_masks"] for kind in m]
        assert len(files) == 6 and all((run / "files" / f).is_file() for f in files), files

    configs = [rec for rec in wandb_records(next(run.glob("run-*.wandb")))
               if rec.WhichOneof("record_type") == "config"]
    keys = {item.key for rec in configs for item in rec.config.update}
    assert {"data", "model", "optim", "train", "tracking"} <= keys


@pytest.mark.slow
def test_inference_job_logs_a_table_and_summary(tmp_path, monkeypatch):
    """`infer --wandb`: an offline W&B run of job type inference with a Table of per-image
    metrics (one row per image, overlay thumbnails) and the summary's means."""
    from lesionseg.checkpoint import save_weights
    from lesionseg.cli import main
    from lesionseg.config import load_config
    from lesionseg.data.synthetic import write_isic_dataset
    from lesionseg.model import MobileNetEncoderDecoder

    isic = write_isic_dataset(tmp_path / "isic", 3, seed=1, min_side=48, max_side=96)
    torch.manual_seed(0)
    cfg = load_config(None, ["model.encoder_weights=null", "data.image_size=64"])
    ckpt = save_weights(tmp_path / "best.pt", MobileNetEncoderDecoder().state_dict(), cfg)
    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(isic), "--out", str(out),
                 "--workers", "0", "--wandb", "--splits", "train",
                 "infer.num_threads=1"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = runs[0]
    rows = [r for r in history_rows(run) if "infer/images/_type" in r]
    assert len(rows) == 1 and rows[0]["infer/images/_type"] == "table-file", history_rows(run)
    table = json.loads((run / "files" / rows[0]["infer/images/path"]).read_text())
    columns = table["columns"]
    assert columns[:4] == ["id", "overlay", "status", "dice"]
    assert sorted(r[0] for r in table["data"]) == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert [r[1] for r in table["data"]] == [f"thumbs/{r[0]}.jpg" for r in table["data"]]
    assert all((out / r[1]).is_file() for r in table["data"])  # offline: the thumbnail's path
    overlays = [r for r in history_rows(run) if "infer/overlays/_type" in r]
    assert len(overlays) == 1 and overlays[0]["infer/overlays/count"] == 3
    assert all((run / "files" / f).is_file() for f in overlays[0]["infer/overlays/filenames"])
    summary = json.loads((out / "summary.json").read_text())
    logged = summary_values(run)
    assert logged["infer/dice"] == pytest.approx(summary["means"]["dice"])
    assert logged["infer/train/dice"] == pytest.approx(summary["means_by_split"]["train"]["dice"])
    assert logged["infer/scored"] == 3 and logged["infer/device"] == "cpu"


def test_a_model_that_predicts_nothing_ends_with_a_loud_warning(packed_shards, tmp_path):
    """A run whose model predicts empty masks everywhere finished as "done", with a threshold
    "chosen … Jaccard 0.0000". Now the log ends with the warning, the W&B summary and the
    model card carry it, and tuning stores no choice."""
    from lesionseg.checkpoint import load_weights

    out = tmp_path / "run"
    r = _offline_train(packed_shards, out, "optim.max_steps=2", "optim.lr=1e-9",
                       "model.head_prior=1e-6", "tracking.log_images=0")
    warning = [line for line in r.stderr.splitlines() if "DEGENERATE MODEL" in line]
    assert len(warning) == 1 and "almost no lesion on val" in warning[0], r.stderr[-3000:]
    assert "no threshold or post-processing chosen" in r.stderr
    assert "postprocess" not in load_weights(out / "best.pt")[2]
    assert "WARNING — degenerate model" in (out / "MODEL_CARD.md").read_text()
    run = next((out / "wandb").glob("offline-run-*"))
    assert "almost no lesion" in summary_values(run)["warning"]
