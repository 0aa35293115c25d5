"""The training job: pipeline units, and end-to-end runs of `jobs/train.py` as a user runs it.

End-to-end runs are tiny (64 px, batch 2, a few steps, one CPU thread per process) and use the
shared `packed_shards` fixture (10 train samples in 3 shards, 6 val samples in 2 shards).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lesionseg.commands.launch import requested_cpu_processes, requested_processes
from lesionseg.config import Config, load_config
from lesionseg.errors import EXIT_RESUME, EXIT_USAGE, DataError
from lesionseg.metrics import METRIC_NAMES
from lesionseg.recipe import resolve as resolve_recipe
from lesionseg.train.build import build_model
from lesionseg.train.data import check_stored_size, plan_data
from lesionseg.train.evaluate import evaluate_checkpoint
from lesionseg.train.schedule import lr_factor, plan_schedule
from lesionseg.train.streams import TrainStream, ValStream, shuffled

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "jobs" / "train.py"
# Small and fast; one thread per process so that runs are also bit-reproducible.
TINY = ["data.image_size=64", "data.batch_size=2", "data.num_workers=1",
        "model.encoder_weights=null", "tracking.backend=none", "train.num_threads=1",
        "train.log_every_steps=1", "optim.warmup_steps=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1"}


def run_train(args: list[str], cwd: Path | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess:
    """`python jobs/train.py ARGS` as a user runs it."""
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_train(args: list[str], log: Path) -> subprocess.Popen:
    """The same, in the background, output to `log`."""
    out = open(log, "w")  # noqa: SIM115 - the child process holds it
    return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args], env=_env(),
                            stdout=out, stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` exists (the run must still be going)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended (status {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload["state_dict"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_cfg(**data: object) -> Config:
    """48 px, batch 2, the recipe resolved as for a long schedule (every augmentation on)."""
    cfg = load_config(None, ["data.image_size=48", "data.batch_size=2", "data.shuffle_buffer=4"])
    resolve_recipe(cfg, total_steps=100, steps_per_epoch=1)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


# ============================================================================ units


def test_schedule_from_counts_and_max_steps():
    cfg = load_config(None, ["data.batch_size=2", "optim.grad_accum_steps=2", "optim.epochs=3"])
    s = plan_schedule(cfg, train_count=40, world=2)
    assert (s.steps_per_epoch, s.total_steps, s.epochs) == (5, 15, 3)
    assert s.micro_batches(0) == 10 and s.micro_batches(15) == 0
    assert s.micro_batches(12, micro=4) == 10  # step 12, 2 steps in: the epoch of steps 10-14
    cfg = load_config(None, ["data.batch_size=2", "optim.max_steps=7", "optim.steps_per_epoch=3"])
    s = plan_schedule(cfg, train_count=1000, world=1)
    assert (s.total_steps, s.epochs, s.micro_batches(6)) == (7, 3, 1)
    # A run of 2 steps extended to 7: its next epoch, at step 2, is a full one (it was cut to 1).
    assert s.micro_batches(2) == 3 and s.micro_batches(5) == 2


def test_batch_size_beyond_the_train_split_is_a_clear_error():
    """data.batch_size=10**8 passed and a worker collected samples until MemoryError."""
    cfg = load_config(None, ["data.batch_size=100000000", "data.shards=shards/x"])
    with pytest.raises(DataError, match=r"data.batch_size=100000000 is more than the 10 train "
                                        r"samples of data.shards=shards/x; use at most 10"):
        plan_schedule(cfg, train_count=10, world=1)
    cfg.data.batch_size = 10
    assert plan_schedule(cfg, train_count=10, world=1).steps_per_epoch == 1


def test_memory_error_while_reading_is_not_blamed_on_the_shard(packed_shards, monkeypatch):
    import webdataset.tariterators as tariterators

    from lesionseg.data.shard_format import read_shard

    def out_of_memory(*_args, **_kwargs):
        raise MemoryError()
        yield  # a generator, like the real one

    monkeypatch.setattr(tariterators, "group_by_keys", out_of_memory)
    url = str(packed_shards / "train-000000.tar")
    for on_error in ("raise", "skip"):
        with pytest.raises(MemoryError):
            list(read_shard(url, on_error))


def test_training_loader_workers_die_with_their_parent(packed_shards):
    """Training's DataLoader workers arm the parent-death signal (lesionseg.workers) before
    their signal set-up; the kill test lives in test_inference (same WorkerInit)."""
    from lesionseg.train.loader import Loader, _WorkerSignals
    from lesionseg.workers import WorkerInit

    cfg = tiny_cfg(num_workers=1)
    dataset = ValStream(tuple(plan_data(str(packed_shards)).val_urls), cfg, 0, 1)
    with Loader(dataset, cfg, torch.device("cpu")) as loader:
        init = loader.loader.worker_init_fn
        assert isinstance(init, WorkerInit) and isinstance(init.then, _WorkerSignals)
        assert init.parent_pid == os.getpid()
        assert sum(len(b["id"]) for b in loader) == 6  # workers start and run with it


def test_lr_warmup_then_cosine():
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0) and factors[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_seeded_shuffle_buffer_is_a_permutation():
    out = list(shuffled(iter(range(50)), 8, random.Random(1)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert out == list(shuffled(iter(range(50)), 8, random.Random(1)))


def _ids(loader: DataLoader) -> list[list[str]]:
    return [b["id"] for b in loader]


def test_train_stream_is_deterministic_and_resume_skips_exactly(packed_shards):
    """With 2 workers: a stream started at batch 3 yields exactly batches 3… of the full one
    (ids and pixels), and every rank yields the same number of batches."""
    urls = plan_data(str(packed_shards)).train_urls
    cfg = tiny_cfg()

    def batches(rank: int, start: int) -> list[dict]:
        ds = TrainStream(urls, cfg, epoch=1, rank=rank, world=2, batches=7, start=start)
        return list(DataLoader(ds, batch_size=None, num_workers=2))

    full, again, resumed = batches(0, 0), batches(0, 0), batches(0, 3)
    other_rank = batches(1, 0)
    assert len(full) == len(other_rank) == 7 and len(resumed) == 4
    assert [b["id"] for b in full] == [b["id"] for b in again]
    assert [b["id"] for b in full] != [b["id"] for b in other_rank]
    for a, b in zip(full[3:], resumed, strict=True):
        assert a["id"] == b["id"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert full[0]["image"].shape == (2, 3, 48, 48) and full[0]["mask"].dtype == torch.uint8
    # uint8 and channels_last all the way to the device, where they become floats.
    assert full[0]["image"].dtype == torch.uint8
    assert full[0]["image"].is_contiguous(memory_format=torch.channels_last)


def test_shards_packed_smaller_than_the_training_size_warn(packed_shards, caplog):
    data = plan_data(str(packed_shards))
    assert data.max_side == json.loads((packed_shards / "manifest.json").read_text())[
        "options"]["max_side"]
    with caplog.at_level("WARNING", logger="lesionseg.training"):
        check_stored_size(data, data.max_side * 3 // 4)
        assert not caplog.records
        check_stored_size(data, data.max_side)
    assert "re-pack with pack.max_side >=" in caplog.text


def test_val_stream_covers_every_sample_exactly_once(packed_shards):
    data = plan_data(str(packed_shards))
    cfg = tiny_cfg()
    seen = []
    for rank in range(2):
        loader = DataLoader(ValStream(data.val_urls, cfg, rank, 2), batch_size=None,
                            num_workers=2)
        seen += [i for b in loader for i in b["id"]]
    assert len(seen) == len(set(seen)) == data.val_count


def test_missing_or_empty_shard_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        plan_data(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="manifest.json"):
        plan_data(str(tmp_path / "empty"))


def _shard_without_mask(packed_shards: Path, out: Path) -> tuple[str, str]:
    """Copy train-000000.tar dropping the first sample's .png; returns (url, that id)."""
    src = packed_shards / "train-000000.tar"
    dropped = None
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for member in tin:
            key, ext = member.name.split(".", 1)
            if dropped is None and ext == "png":
                dropped = key
                continue
            tout.addfile(member, io.BytesIO(tin.extractfile(member).read()))
    return str(out), dropped


def test_shard_cut_short_by_a_damaged_header_is_not_silently_shorter(packed_shards, tmp_path,
                                                                      caplog):
    """tarfile (and WebDataset's reader) end a tar at a damaged header as if it were complete:
    read_shard checks the count against the manifest, so training never drops samples
    silently (a DataError naming the shard; with data.on_error=skip, a warning)."""
    from lesionseg.data.shard_format import read_shard

    shards = tmp_path / "shards"
    shutil.copytree(packed_shards, shards)
    bad = shards / "train-000001.tar"
    with tarfile.open(bad) as tf:
        second_jpg = tf.getmembers()[3].offset
    data = bytearray(bad.read_bytes())
    data[second_jpg:second_jpg + 16] = b"\x8f" * 16
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000001.tar.*1 of the 4 samples"):
        list(read_shard(str(bad), "raise"))
    with caplog.at_level("WARNING"):
        assert len(list(read_shard(str(bad), "skip"))) == 1
    assert "1 of the 4 samples" in caplog.text
    assert len(list(read_shard(str(shards / "train-000000.tar"), "raise"))) == 4


def test_sample_without_mask_raises_or_is_skipped(packed_shards, tmp_path):
    url, missing = _shard_without_mask(packed_shards, tmp_path / "train-000000.tar")
    with pytest.raises(DataError, match=f"{missing}.*png.*data.on_error=skip"):
        list(TrainStream((url,), tiny_cfg(), 0, 0, 1, batches=3))
    batches = list(TrainStream((url,), tiny_cfg(on_error="skip"), 0, 0, 1, batches=3))
    assert all(len(b["id"]) == 2 for b in batches)  # refilled from the same batch
    skipped = [m for b in batches for m in b["skipped"]]
    assert skipped and all(missing in m for m in skipped)


def test_cpu_launch_with_one_process_is_detected():
    """`accelerate launch --cpu --num_processes N` starts one process; so does --num_processes N
    without --cpu on a machine without a GPU: both are read from the launcher's command line."""
    parent = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--cpu",
              "--num_processes", "2", "jobs/train.py"]
    env = {"ACCELERATE_USE_CPU": "True"}
    assert requested_cpu_processes(env, parent) == 2
    assert requested_cpu_processes(env, [*parent[:4], "--num-processes=3"]) == 3
    assert requested_cpu_processes({**env, "WORLD_SIZE": "2"}, parent) == 1  # real ranks
    assert requested_cpu_processes(env, ["bash", "run.sh"]) == 1
    # Without --cpu, Accelerate's simple launcher also starts one process when it finds fewer
    # than two GPUs: on a machine without a GPU the N asked for are CPU ranks; with one GPU
    # the one process stands (warned about).
    plain = [a for a in parent if a != "--cpu"]
    assert requested_cpu_processes({"ACCELERATE_USE_CPU": "False"}, plain, gpus=0) == 2
    assert requested_cpu_processes({"ACCELERATE_USE_CPU": "False"}, plain, gpus=1) == 1
    assert requested_processes({"ACCELERATE_USE_CPU": "False"}, plain) == 2


# ============================================================================ end to end


@pytest.mark.slow
def test_end_to_end_run_writes_weights_config_and_states(packed_shards, tmp_path):
    out = tmp_path / "run"
    r = run_train(["--config", str(ROOT / "tests" / "train_tiny.yaml"),
                   f"data.shards={packed_shards}", "optim.max_steps=4",
                   "train.val_every_steps=2", "train.keep_states=1", f"train.output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 1" in r.stderr and "effective batch 2" in r.stderr
    for name in ("best.pt", "last.pt"):
        payload = torch.load(out / name, map_location="cpu", weights_only=True)
        assert payload["state_dict"] and payload["meta"]["step"] in (2, 4)
    assert torch.load(out / "last.pt", weights_only=True)["meta"]["step"] == 4
    cfg = load_config(out / "config.yaml")
    assert cfg.data.shards == str(packed_shards) and cfg.optim.max_steps == 4
    assert cfg.data.image_size == 64 and cfg.model.encoder_weights is None  # from the YAML
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4] and all(x["images"] == 6 for x in lines)
    assert [p.name for p in (out / "states").iterdir()] == ["step-0000004"]


@pytest.mark.slow
def test_two_ranks_finish_and_match_one_process_evaluation(packed_shards, tmp_path):
    """2 gloo ranks on 3 train shards (uneven per rank) finish; the distributed validation
    of the final weights equals a 1-process evaluation of last.pt."""
    out = tmp_path / "run"
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(TRAIN_SCRIPT), f"data.shards={packed_shards}", *TINY,
           "optim.max_steps=8", "optim.lr=0.01", "optim.encoder_lr_mult=1",
           f"train.output_dir={out}"]
    r = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2 (MULTI_CPU)" in r.stderr
    distributed = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert distributed["step"] == 8 and distributed["images"] == 6
    single = evaluate_checkpoint(out / "last.pt", batch_size=4)
    for name in METRIC_NAMES:
        assert distributed[name] == single[name], name


@pytest.mark.slow
def test_bf16_autocast_with_gradient_accumulation(packed_shards, tmp_path):
    out = tmp_path / "run"
    r = run_train([f"data.shards={packed_shards}", *TINY, "optim.max_steps=2",
                   "train.mixed_precision=bf16", "optim.grad_accum_steps=2",
                   f"train.output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mixed precision bf16" in r.stderr
    assert "× 2 accumulation steps = effective batch 4" in r.stderr
    state = load_state_dict(out / "last.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["true", "false"], ids=["from-memory", "streamed"])
def test_stop_signal_then_kill_then_resume_ends_identical(packed_shards, tmp_path, cache):
    """Reference run A; run B gets SIGUSR1 (state saved, exit 75), resumes, is SIGKILLed at a
    random moment, resumes again: B's last.pt equals A's bit for bit (BN statistics too).
    Two workers, gradient accumulation and mid-epoch states exercise the data position, with
    the train set in memory (data.cache, flips only) and streamed from the shards."""
    args = [f"data.shards={packed_shards}", *TINY, "data.num_workers=2", f"data.cache={cache}",
            "optim.grad_accum_steps=2", "optim.max_steps=9", "optim.steps_per_epoch=4",
            "train.save_every_steps=1", "train.val_every_steps=3", "train.keep_states=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_train([*args, f"train.output_dir={a}"])
    assert r.returncode == 0, r.stderr[-3000:]

    proc = start_train([*args, f"train.output_dir={b}"], tmp_path / "b1.log")
    wait_for(b / "states" / "step-0000002", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == EXIT_RESUME, (tmp_path / "b1.log").read_text()[-3000:]
    stopped_at = max(int(p.name.split("-")[1]) for p in (b / "states").glob("step-*"))
    assert 2 <= stopped_at < 9

    proc = start_train([*args, f"train.output_dir={b}"], tmp_path / "b2.log")
    wait_for(b / "states" / f"step-{stopped_at + 1:07d}", proc)
    time.sleep(random.uniform(0.0, 0.8))
    proc.kill()
    proc.wait(timeout=60)
    log2 = (tmp_path / "b2.log").read_text()
    assert f"step {stopped_at}" in log2 and "resumed from" in log2

    r = run_train([*args, f"train.output_dir={b}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    sa, sb = load_state_dict(a / "last.pt"), load_state_dict(b / "last.pt")
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert any("running_mean" in k for k in sa)


@pytest.mark.slow
def test_frozen_encoder_is_unchanged_by_training(packed_shards, tmp_path):
    from accelerate.utils import set_seed

    out = tmp_path / "run"
    r = run_train([f"data.shards={packed_shards}", *TINY, "optim.max_steps=3",
                   "model.freeze_encoder=true", f"train.output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    trained = load_state_dict(out / "last.pt")
    set_seed(0)  # train.seed: the same initial weights as the run
    initial = build_model(load_config(out / "config.yaml")).state_dict()
    encoder = [k for k in initial if k.startswith("encoder.")]
    decoder = [k for k in initial if k.startswith("decoder.") and "weight" in k]
    assert all(torch.equal(initial[k], trained[k]) for k in encoder)  # BN statistics too
    assert any(not torch.equal(initial[k], trained[k]) for k in decoder)


@pytest.mark.slow
def test_no_argument_default_builds_demo_data_and_trains(tmp_path):
    """`python jobs/train.py` with only shortening overrides: builds the demo set under
    shards/demo, trains, writes best.pt and says it was demo data."""
    r = run_train(["data.demo_cases=12", "data.image_size=64", "data.batch_size=2",
                   "optim.max_steps=2", "tracking.backend=none", "data.num_workers=0"],
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "shards" / "demo" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "demo" / "best.pt").is_file()
    assert "DEMO on synthetic data" in r.stderr and "data.shards=" in r.stderr
    cfg = load_config(tmp_path / "runs" / "demo" / "config.yaml")
    assert cfg.model.encoder_weights is None and cfg.data.shards == "shards/demo"


@pytest.mark.slow
def test_corrupt_shard_is_a_clear_one_line_error(packed_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(packed_shards, shards)
    bad = shards / "train-000001.tar"
    data = bytearray(bad.read_bytes())
    data[0:1024] = os.urandom(1024)  # the first tar header and part of the first file
    bad.write_bytes(bytes(data))
    r = run_train([f"data.shards={shards}", *TINY, "optim.max_steps=6",
                   f"train.output_dir={tmp_path / 'run'}"], timeout=180)
    assert r.returncode == EXIT_USAGE, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "train-000001.tar" in last and "corrupt" in last and "Traceback" not in r.stderr


def test_non_finite_steps_are_counted_and_too_many_abort():
    from lesionseg.train.resume import Progress
    from lesionseg.train.step import TrainingError, count_bad_steps

    progress = Progress(step=7)
    count_bad_steps(progress, applied=False, max_bad=3)
    count_bad_steps(progress, applied=True, max_bad=3)  # a good step resets the count
    assert progress.bad_steps == 0
    count_bad_steps(progress, applied=False, max_bad=3)
    count_bad_steps(progress, applied=False, max_bad=3)
    with pytest.raises(TrainingError, match="3 optimizer steps in a row.*non-finite"):
        count_bad_steps(progress, applied=False, max_bad=3)


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    from lesionseg.cli import main

    existing = tmp_path / "notes.txt"
    existing.write_text("a file")
    for out in (existing, existing / "run"):
        assert main(["train", f"train.output_dir={out}", *TINY]) == EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "train.output_dir" in err[0] and "existing file" in err[0], err


@pytest.mark.slow
def test_resume_traps_in_an_existing_run_folder(packed_shards, tmp_path):
    """Other settings than the state's are refused (naming them and the ways out), config.yaml
    untouched; a finished run asked for more steps goes on (past a cut-short last epoch);
    train.resume_with_changes goes on from the weights, and config.yaml then describes the new
    weights; train.resume=none moves the old run aside."""
    out = tmp_path / "run"
    base = ["--config", str(ROOT / "tests" / "train_tiny.yaml"), f"data.shards={packed_shards}",
            f"train.output_dir={out}"]
    r = run_train([*base, "optim.max_steps=2"])  # 5 steps an epoch: the only epoch is cut short
    assert r.returncode == 0, r.stderr[-3000:]
    config_before = (out / "config.yaml").read_bytes()

    r = run_train([*base, "optim.max_steps=2", "data.batch_size=4"])
    assert r.returncode == EXIT_USAGE, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and "data.batch_size=4 (was 2)" in last
    assert all(way in last for way in ("train.output_dir", "train.resume=none",
                                       "train.resume_with_changes=true"))
    assert (out / "config.yaml").read_bytes() == config_before

    r = run_train([*base, "optim.max_steps=8"])  # extend: a full epoch, then a 1-step one
    assert r.returncode == 0, r.stderr[-3000:]
    assert "extending the finished run from step 2 to 8" in r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["meta"]["step"] == 8

    r = run_train([*base, "optim.max_steps=8"])
    assert r.returncode == 0 and "finished at step 8; nothing to train" in r.stderr

    r = run_train([*base, "optim.max_steps=9", "data.image_size=96",
                   "train.resume_with_changes=true"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "changed settings (data.image_size=96 (was 64))" in r.stderr
    last_pt = torch.load(out / "last.pt", weights_only=True)
    assert last_pt["meta"]["step"] == 9 and last_pt["config"]["data"]["image_size"] == 96
    assert load_config(out / "config.yaml").data.image_size == 96

    r = run_train([*base, "optim.max_steps=1", "train.resume=none"])
    assert r.returncode == 0, r.stderr[-3000:]
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "last.pt").is_file()
    assert [p.name for p in (out / "states").iterdir()] == ["step-0000001"]
    assert torch.load(out / "last.pt", weights_only=True)["meta"]["step"] == 1


def test_resume_none_sets_aside_everything_derived_from_the_old_weights(tmp_path):
    """train.resume=none left the old best.onnx/best.ts beside the new best.pt (`infer
    --checkpoint runs/x/best.onnx` would run the old model); now they go aside with it."""
    from lesionseg.train.resume import set_aside_previous_run

    run = tmp_path / "run"
    (run / "states" / "step-0000002").mkdir(parents=True)
    old = ["best.pt", "last.pt", "best.onnx", "best.fp16.onnx", "best.ts", "MODEL_CARD.md",
           "config.yaml", "metrics.jsonl"]
    for name in [*old, "notes.txt"]:
        (run / name).write_text(name)
    aside = set_aside_previous_run(run)
    assert sorted(p.name for p in run.iterdir()) == sorted(["notes.txt", aside.name])
    assert sorted(p.name for p in aside.iterdir()) == sorted([*old, "states"])


def test_plan_data_names_a_zip_given_as_shards(tmp_path):
    archive = tmp_path / "isic2016.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(DataError, match="a file, not a packed shard folder.*jobs/pack.py"):
        plan_data(str(archive))


def test_default_shards_feed_the_readme_multi_process_examples(caplog):
    """pack.shard_max_samples=500 gave ISIC's ~640 training cases one shard, and the README's
    own 2-process and 8-GPU examples warned "1 train shard(s) for 4 reader lanes"."""
    import math

    from lesionseg.config import PackConfig
    from lesionseg.train.cache import Memory
    from lesionseg.train.data import DataPlan
    from lesionseg.train.loop import _warn_shared_shards

    shards = math.ceil(640 / PackConfig().shard_max_samples)
    data = DataPlan("shards/isic2016", tuple(f"train-{i:06d}.tar" for i in range(shards)), (),
                    640, 72)
    cfg = load_config(None, [])
    with caplog.at_level("WARNING"):
        for world in (2, 8):  # README: --num_processes 2 on a CPU; 8 GPUs
            _warn_shared_shards(cfg, data, Memory(None, None, ""), world)
    assert "reader lanes" not in caplog.text


def test_an_images_and_masks_pack_trains(isic_root, tmp_path):
    """The images/ + masks/ layout was refused by pack ("duplicate id case000: 2 images");
    now it packs by stem and trains like any shard folder."""
    from PIL import Image

    from lesionseg.config import PackConfig
    from lesionseg.data.shards import pack
    from lesionseg.data.synthetic import OFFICIAL_NAMES

    own = tmp_path / "own"
    (own / "images").mkdir(parents=True)
    (own / "masks").mkdir()
    for i, p in enumerate(sorted((isic_root / OFFICIAL_NAMES["train", "image"]).glob("*.jpg"))[:8]):
        Image.open(p).save(own / "images" / f"case{i:03d}.png")
        shutil.copy(isic_root / OFFICIAL_NAMES["train", "mask"] / f"{p.stem}_Segmentation.png",
                    own / "masks" / f"case{i:03d}.png")
    shards = tmp_path / "shards"
    pack([own / "images", own / "masks"], shards, PackConfig(val_fraction=0.4, workers=1),
         progress=False)
    r = run_train(["--config", str(ROOT / "tests" / "train_tiny.yaml"), f"data.shards={shards}",
                   "optim.max_steps=2", f"train.output_dir={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "best.pt").is_file()


# ============================================================================ model.init_from


def test_init_from_loads_every_weight_of_an_earlier_checkpoint(tiny_checkpoint):
    """model.init_from: every parameter and buffer of the new model is the checkpoint's (the
    head prior and encoder weights are not applied over them)."""
    cfg = load_config(None, ["model.encoder_weights=imagenet",
                             f"model.init_from={tiny_checkpoint['ckpt']}"])
    model = build_model(cfg)
    saved = load_state_dict(tiny_checkpoint["ckpt"])
    ours = model.state_dict()
    assert ours.keys() == saved.keys()
    assert all(torch.equal(ours[k], saved[k]) for k in saved)


def test_init_from_a_missing_file_or_another_decoder_is_a_clear_error(tiny_checkpoint, tmp_path):
    from lesionseg.checkpoint import CheckpointError
    from lesionseg.config import ConfigError

    with pytest.raises(ConfigError, match="model.init_from.*not a file"):
        load_config(None, [f"model.init_from={tmp_path / 'nope.pt'}"])
    cfg = load_config(None, [f"model.init_from={tiny_checkpoint['ckpt']}",
                             "model.decoder_channels=[64,48,32,16]"])
    with pytest.raises(CheckpointError, match="decoder_channels"):
        build_model(cfg)


@pytest.mark.slow
def test_a_run_fine_tuned_from_an_earlier_model_says_so(packed_shards, tiny_checkpoint,
                                                        tmp_path):
    out = tmp_path / "tuned"
    r = run_train(["--config", str(ROOT / "tests" / "train_tiny.yaml"),
                   f"data.shards={packed_shards}", "optim.max_steps=2",
                   f"model.init_from={tiny_checkpoint['ckpt']}", f"train.output_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"every weight from {tiny_checkpoint['ckpt']}" in r.stderr
    assert "whole-model encoder" in r.stderr  # the recipe treats it as pretrained
    assert f"initialised from every weight of `{tiny_checkpoint['ckpt']}`" in (
        out / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_ctrl_c_mid_epoch_saves_resumes_identical_and_wandb_has_every_step(packed_shards,
                                                                          tmp_path):
    """Ctrl-C (SIGINT to the whole process group, workers and fork server included) in the
    middle of an epoch: state saved, one line saying how to resume, exit 75; the rerun ends
    with the weights of an uninterrupted run, bit for bit; the two offline W&B segments hold
    every logged step between them, and each has its exit record."""
    from test_tracking import history_rows, wandb_records

    args = [f"data.shards={packed_shards}", *TINY, "data.num_workers=2", "data.cache=false",
            "optim.max_steps=16", "optim.steps_per_epoch=8", "tracking.backend=wandb"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_train([*args, f"train.output_dir={a}"])
    assert r.returncode == 0, r.stderr[-3000:]

    log = tmp_path / "b1.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *args,
                                 f"train.output_dir={b}"], env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, process_group=0)
    deadline = time.monotonic() + 120
    while "step 9: loss=" not in log.read_text():  # early in the second epoch
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
    assert proc.wait(timeout=120) == EXIT_RESUME, log.read_text()[-3000:]
    text = log.read_text()
    stopped = [ln for ln in text.splitlines() if "stop requested (signal): state saved" in ln]
    assert len(stopped) == 1 and "rerun the same command to resume" in stopped[0], text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    step = max(int(p.name.split("-")[1]) for p in (b / "states").glob("step-*"))
    assert 9 <= step < 16  # mid-epoch: the epoch's own state was at 8

    r = run_train([*args, f"train.output_dir={b}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    sa, sb = load_state_dict(a / "last.pt"), load_state_dict(b / "last.pt")
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])]

    segments = sorted((b / "wandb").glob("offline-run-*"))
    assert len(segments) == 2
    steps = []
    for run in segments:
        records = list(wandb_records(next(run.glob("run-*.wandb"))))
        exits = [rec.exit for rec in records if rec.WhichOneof("record_type") == "exit"]
        assert len(exits) == 1, run
        steps += [row["_step"] for row in history_rows(run) if "train/loss" in row]
    assert sorted(steps) == list(range(1, 17))


def test_missing_encoder_weights_file_is_one_line_before_any_work(tmp_path, capsys):
    from lesionseg.cli import main

    out = tmp_path / "run"
    missing = tmp_path / "mobilenet_v2.pth"
    assert main(["train", f"model.encoder_weights={missing}", "data.shards=nowhere",
                 f"train.output_dir={out}"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lesionseg train: error: {missing}: encoder weights file not found"], err
    assert not out.exists()


@pytest.mark.slow
def test_stop_signal_during_start_up_is_a_stop(packed_shards, tmp_path):
    """SIGTERM while the job still imports torch: exit 75 and one line, not 143."""
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), f"data.shards={packed_shards}",
                             *TINY, f"train.output_dir={tmp_path / 'run'}"], env=_env(),
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RESUME, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("jobs/train.py: ")]
    assert lines == ["jobs/train.py: stopped: SIGTERM during start-up, before there was a state "
                     "to save; rerun the same command to start (or resume)"], err[-3000:]
    assert "Traceback" not in err
