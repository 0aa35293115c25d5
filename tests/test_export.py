"""lesionseg.export, lesionseg.runtime and the infer job's onnxruntime backend: exported files
match PyTorch, carry their metadata, are refused when they do not match, and the job gives
the same masks on every backend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_POSTPROCESS, TINY_SIZE
from PIL import Image

from lesionseg import __version__, export
from lesionseg.checkpoint import build_model_from_checkpoint, save_weights
from lesionseg.cli import main
from lesionseg.export import export_model, reference_probabilities
from lesionseg.files import sha256_file
from lesionseg.runtime import export_format, open_backend, read_metadata

# In [dev] (CI runs these); without the [export] extra the module is skipped.
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """fp32 ONNX (uint8 input), fp16 ONNX and TorchScript exports of the tiny checkpoint, made
    through the command line into one folder (read-only for the tests)."""
    folder = tmp_path_factory.mktemp("exports")
    ckpt = tiny_checkpoint["ckpt"]
    paths = {"onnx": folder / "best.onnx", "fp16": folder / "best-fp16.onnx",
             "ts": folder / "best.ts"}
    flags = {"onnx": ["--format", "onnx"], "fp16": ["--format", "onnx", "--fp16"],
             "ts": ["--format", "torchscript"]}
    for key, path in paths.items():
        assert main(["export", "--checkpoint", str(ckpt), *flags[key], "--out", str(path)]) == 0
    return {"ckpt": ckpt, "folder": folder, **paths}


def random_batch(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_onnx_file_has_dynamic_uint8_input_and_matches_torch(exported: dict) -> None:
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name, out.type) == (
        "images", "tensor(uint8)", "probabilities", "tensor(float)")
    assert inp.shape == ["N", 3, "H", "W"] and out.shape == ["N", "H", "W"]
    model, _, _ = build_model_from_checkpoint(exported["ckpt"])
    # Sizes the parity check did not use: odd, a multiple of 32, the smallest side, batch 5.
    for shape in ((1, 3, 33, 47), (5, 3, 64, 64), (2, 3, 32, 160), (1, 3, 127, 95)):
        x = random_batch(shape)
        got = session.run(None, {"images": x.numpy()})[0]
        ref = reference_probabilities(model, x).numpy()
        assert got.shape == ref.shape == (shape[0], *shape[2:])
        assert np.abs(got - ref).max() <= 1e-4
        assert ((got > 0.45) == (ref > 0.45)).mean() >= 0.9999


def test_metadata_round_trip(exported: dict, tiny_checkpoint: dict) -> None:
    meta = read_metadata(exported["onnx"])
    assert meta["format"] == "lesionseg-export/1" and meta["lesionseg_version"] == __version__
    assert meta["checkpoint_sha256"] == sha256_file(tiny_checkpoint["ckpt"])
    assert meta["image_size"] == TINY_SIZE and meta["precision"] == "fp32"
    assert meta["threshold"] == TINY_POSTPROCESS["threshold"]
    assert meta["postprocess"]["steps"] == TINY_POSTPROCESS["steps"]
    assert meta["empty_fallback"] == 0.5 and "empty_fallback" in meta["output"]["meaning"]
    assert meta["input"]["dtype"] == "uint8 0-255" and meta["input"]["min_side"] == 32
    assert meta["config"]["data"]["image_size"] == TINY_SIZE
    assert meta["checkpoint_meta"]["val"]["dice"] == 0.5
    parity = meta["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4
    assert parity["mask_agreement"] >= 0.9999 and len(parity["batches"]) == 4
    ts = read_metadata(exported["ts"])
    assert ts["file_format"] == "torchscript" and ts["checkpoint_sha256"] == meta["checkpoint_sha256"]
    assert export_format(exported["ts"]) == "torchscript"
    assert export_format(exported["onnx"]) == "onnx"
    assert export_format(tiny_checkpoint["ckpt"]) is None  # a checkpoint is not an export


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_takes_uint8_and_float(exported: dict) -> None:
    module = torch.jit.load(str(exported["ts"]))
    x = random_batch((2, 3, 45, 70), seed=1)
    with torch.inference_mode():
        a, b = module(x), module(x.float() / 255)
    model, _, _ = build_model_from_checkpoint(exported["ckpt"])
    ref = reference_probabilities(model, x)
    assert a.shape == (2, 45, 70)
    assert (a - ref).abs().max() <= 1e-4 and (b - ref).abs().max() <= 1e-4


def test_fp16_is_half_the_size_keeps_fp32_io_and_states_its_error(exported: dict) -> None:
    assert exported["fp16"].stat().st_size < 0.55 * exported["onnx"].stat().st_size
    meta = read_metadata(exported["fp16"])
    assert meta["precision"] == "fp16"
    assert meta["parity"]["passed"] and meta["parity"]["limits"]["max_abs"] == 1e-2
    assert 0 < meta["parity"]["max_abs_diff"] <= 1e-2
    backend, _ = open_backend(exported["fp16"])
    out = backend(random_batch((1, 3, 40, 50)))
    assert out.dtype == torch.float32 and out.shape == (1, 40, 50)


def test_float_input_onnx(tiny_checkpoint: dict, tmp_path: Path) -> None:
    path = export_model(tiny_checkpoint["ckpt"], tmp_path / "f.onnx", input_dtype="float",
                        write_card=False).path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    backend, _ = open_backend(path)
    x = random_batch((1, 3, 50, 41))
    model, _, _ = build_model_from_checkpoint(tiny_checkpoint["ckpt"])
    assert (backend(x) - reference_probabilities(model, x)).abs().max() <= 1e-4  # uint8 → float


def test_verify_passes_and_fails_on_a_tampered_file(exported: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    ckpt = str(exported["ckpt"])
    assert main(["export", "--checkpoint", ckpt, "--verify", str(exported["onnx"])]) == 0
    assert "PASS: max |Δp|" in capsys.readouterr().out
    proto = onnx.load(str(exported["onnx"]))
    bias = next(t for t in proto.graph.initializer if t.dims == [1])  # the logit head's bias
    value = onnx.numpy_helper.to_array(bias) + 0.05  # a small change: it must be caught
    bias.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), bias.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    assert main(["export", "--checkpoint", ckpt, "--verify", str(tampered)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: max |Δp|" in out and "(limit 0.0001)" in out


def test_verify_names_a_foreign_checkpoint(exported: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    model, cfg, _ = build_model_from_checkpoint(exported["ckpt"])
    other = save_weights(tmp_path / "other.pt", model.state_dict(), cfg, note="different file")
    assert main(["export", "--checkpoint", str(other), "--verify", str(exported["onnx"])]) == 2
    assert "exported from a checkpoint with sha256" in capsys.readouterr().err


def test_export_that_does_not_match_is_not_written(tiny_checkpoint: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """A folding that breaks the model (here: a shifted head bias) is caught by the parity
    check, and no file is left behind."""
    fold = export.fuse_for_inference

    def broken(model: torch.nn.Module) -> torch.nn.Module:
        fused = fold(model)
        fused.decoder.head.bias.data += 0.05
        return fused

    monkeypatch.setattr(export, "fuse_for_inference", broken)
    out = tmp_path / "bad.onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint["ckpt"]), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "not written: the exported model does not match PyTorch" in printed and "FAIL" in printed
    assert list(tmp_path.iterdir()) == []


def test_model_card_beside_exports_lists_them(exported: dict, tiny_checkpoint: dict) -> None:
    card = (exported["folder"] / "MODEL_CARD.md").read_text()
    assert "Research use only. Not a medical device" in card
    assert "dermoscopy" in card and "not on clinical" in card
    assert sha256_file(tiny_checkpoint["ckpt"]) in card
    assert "threshold **0.45**, post-processing **main**" in card
    for name in ("best.onnx", "best-fp16.onnx", "best.ts"):
        assert f"| `{name}` |" in card
    assert "parameters: 2,986,505" in card


def test_export_refuses_bad_options(tiny_checkpoint: dict, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    ckpt = str(tiny_checkpoint["ckpt"])
    assert main(["export", "--checkpoint", ckpt, "--format", "torchscript", "--fp16",
                 "--out", str(tmp_path / "x.ts")]) == 2
    assert "--fp16 is offered for ONNX only" in capsys.readouterr().err
    assert main(["export", "--checkpoint", ckpt, "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- the infer job


def run_infer(ckpt: Path, data: dict, out: Path, *extra: str) -> dict | None:
    """The infer command in this process; the summary once every part is merged."""
    argv = ["infer", "--checkpoint", str(ckpt), "--input", str(data["images"]), "--masks",
            str(data["truth"]), "--out", str(out), "--workers", "0", "--batch-size", "2", "--splits", "train",
            *extra, "infer.num_threads=1"]
    assert main(argv) == 0
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None


def masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "masks").glob("*.png"))}


def test_infer_job_gives_torch_masks_on_every_backend(exported: dict, tiny_checkpoint: dict,
                                                      tmp_path: Path) -> None:
    # fp32 on torch too (auto is bf16 on a CPU with bf16 hardware; the exported files run fp32)
    torch_sum = run_infer(exported["ckpt"], tiny_checkpoint, tmp_path / "torch",
                          "infer.mixed_precision=no")
    reference = masks(tmp_path / "torch")
    assert len(reference) == 5 and torch_sum["backend"] == "torch"
    assert 0 < np.mean([m.mean() / 255 for m in reference.values()]) < 1  # not empty, not full
    runs = {"fly": (exported["ckpt"], ("--backend", "onnxruntime")),
            "onnx": (exported["onnx"], ()), "ts": (exported["ts"], ())}
    for name, (ckpt, extra) in runs.items():
        summary = run_infer(ckpt, tiny_checkpoint, tmp_path / name, *extra)
        assert summary["backend"] == {"ts": "torchscript"}.get(name, "onnxruntime"), name
        assert summary["threshold"] == 0.45 and summary["postprocess"] == "main"
        got = masks(tmp_path / name)
        assert got.keys() == reference.keys()
        for key, mask in reference.items():
            assert (got[key] == mask).mean() >= 0.9999, (name, key)
        assert summary["means"]["dice"] == pytest.approx(torch_sum["means"]["dice"], abs=1e-3)


def test_onnxruntime_job_resumes_and_splits(exported: dict, tiny_checkpoint: dict,
                                            tmp_path: Path) -> None:
    out = tmp_path / "split"
    for part in (0, 1):
        run_infer(exported["onnx"], tiny_checkpoint, out, "--num-shards", "2",
                  "--shard-index", str(part))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["masks_written"] == 5
    first = masks(out)
    shutil.rmtree(out / "masks")  # rows say the work is done: a rerun must not redo it
    run_infer(exported["onnx"], tiny_checkpoint, out, "--num-shards", "2", "--shard-index", "0")
    assert not (out / "masks").exists() or not any((out / "masks").iterdir())
    assert len(first) == 5


def test_exported_files_make_an_ensemble_on_their_runtimes(exported: dict, tiny_checkpoint: dict,
                                                           tmp_path: Path) -> None:
    """An ONNX and a TorchScript file of one model as the two members of an ensemble: the mean
    of their probabilities is torch's, and the job gives torch's masks."""
    from lesionseg.config import InferConfig
    from lesionseg.data.images import load_image
    from lesionseg.data.transforms import eval_transform, stack_images
    from lesionseg.inference import Ensemble, load_ensemble, load_predictor

    cpu = torch.device("cpu")
    ensemble, _, meta, size = load_ensemble([exported["onnx"], exported["ts"]], InferConfig(), cpu)
    assert isinstance(ensemble, Ensemble) and size == TINY_SIZE
    assert meta["postprocess"]["threshold"] == TINY_POSTPROCESS["threshold"]  # both agree
    reference, _, _ = load_predictor(exported["ckpt"], InferConfig(mixed_precision="no"), cpu)
    images = stack_images([eval_transform(load_image(p.read_bytes())[0], None, TINY_SIZE)[0]
                           for p in sorted(tiny_checkpoint["images"].glob("*.jpg"))[:2]])
    members = [m(images) for m in ensemble.members]
    assert torch.allclose(ensemble(images), (members[0] + members[1]) / 2, rtol=0, atol=1e-7)
    assert torch.allclose(ensemble(images), reference(images), rtol=0, atol=1e-4)
    summary = run_infer(exported["onnx"], tiny_checkpoint, tmp_path / "ens", "--checkpoint",
                        str(exported["ts"]))
    run_infer(exported["ckpt"], tiny_checkpoint, tmp_path / "torch", "infer.mixed_precision=no")
    assert summary["backend"] == "onnxruntime" and len(summary["checkpoint"]["members"]) == 2
    got, want = masks(tmp_path / "ens"), masks(tmp_path / "torch")
    assert got.keys() == want.keys() and all((got[k] == want[k]).mean() >= 0.9999 for k in want)
