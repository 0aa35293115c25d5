"""MobileNetEncoderDecoder: shapes, memory formats, autocast, freezing, weights, compile, DDP."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchvision.models import mobilenet_v2

from lesionseg.checkpoint import build_model_from_checkpoint, load_weights, save_weights
from lesionseg.config import Config, load_config
from lesionseg.errors import UserError
from lesionseg.model import (
    CustomDecoder,
    MobileNetEncoder,
    MobileNetEncoderDecoder,
    fuse_for_inference,
    shades_of_gray,
)
from lesionseg.weights import (
    ALLOW_DOWNLOAD_ENV,
    WeightsError,
    imagenet_cache_path,
    load_plain_tensors,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Two cores are shared by several people: keep each test on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> MobileNetEncoderDecoder:
    torch.manual_seed(0)
    return MobileNetEncoderDecoder().eval()


def _encoder_equal(model: MobileNetEncoderDecoder, state: dict[str, torch.Tensor]) -> bool:
    """Whether the encoder holds exactly the `features.*` tensors of a torchvision state dict."""
    own = model.encoder.state_dict()
    return all(torch.equal(own[k], state[k]) for k in own)


@pytest.mark.parametrize("size", [(257, 383), (32, 32), (64, 96), (33, 65)])
def test_output_shape_and_dtype(model, size):
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, *size)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_odd_sizes_are_reflect_padded_bottom_right_and_cropped(model):
    """model(x) for 40×70 equals the top-left crop of the model on the reflect-padded 64×96
    image; the colour constancy sees the image itself, not the padding."""
    x = torch.rand(1, 3, 40, 70)
    padded = torch.nn.functional.pad(x, (0, 26, 0, 24), mode="reflect")
    with torch.no_grad():
        assert torch.allclose(model(x), model(padded)[..., :40, :70], atol=1e-5)
        # With colour constancy, on the image itself: the padding does not skew the illuminant.
        model.color_constancy = True
        try:
            balanced = torch.nn.functional.pad(shades_of_gray(x), (0, 26, 0, 24), mode="reflect")
            y = model(x)
            model.color_constancy = False
            assert torch.allclose(y, model(balanced)[..., :40, :70], atol=1e-5)
        finally:
            model.color_constancy = False


def test_shades_of_gray_makes_the_illuminant_grey_and_keeps_grey_images():
    """A colour cast (channels scaled 1, 0.7, 0.5) is removed: the channels' 6-norms come out
    equal; a grey image is unchanged; values stay in [0, 1]."""
    base = torch.rand(2, 1, 32, 32).expand(2, 3, 32, 32) * 0.8
    cast = base * torch.tensor([1.0, 0.7, 0.5]).view(1, 3, 1, 1)
    out = shades_of_gray(cast)
    norms = out.pow(6).mean(dim=(2, 3)).pow(1 / 6)
    assert torch.allclose(norms, norms[:, :1].expand_as(norms), rtol=1e-3)
    assert torch.allclose(shades_of_gray(base), base, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = MobileNetEncoderDecoder().eval().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 257, 383).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x.contiguous())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert y.shape == (2, 1, 257, 383)
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y.float()).all()
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.1


def test_too_small_or_wrong_shape_is_refused(model):
    with pytest.raises(ValueError, match="at least 32"):
        model(torch.rand(1, 3, 31, 64))
    with pytest.raises(ValueError, match="N×3×H×W"):
        model(torch.rand(1, 1, 64, 64))


def test_parameter_budget_and_groups(model):
    params = list(model.parameters())
    assert sum(p.numel() for p in params) <= 4_000_000
    enc, dec = list(model.encoder_parameters()), list(model.decoder_parameters())
    assert {id(p) for p in enc}.isdisjoint(id(p) for p in dec)
    assert {id(p) for p in enc} | {id(p) for p in dec} == {id(p) for p in params}


def test_inference_fusion_folds_every_batchnorm_and_keeps_the_outputs():
    torch.manual_seed(0)
    model = MobileNetEncoderDecoder().eval()
    for m in model.modules():  # non-trivial statistics, as a trained model has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy
    assert not any(p.requires_grad for p in fused.parameters())
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        assert torch.allclose(model(x), fused(x), atol=1e-4, rtol=1e-4)


def test_normalization_is_a_buffer_in_the_state_dict(model):
    state = model.state_dict()
    assert torch.allclose(state["mean"].flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(state["std"].flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert not any(b.requires_grad for b in model.buffers())


def test_encoder_skips_and_decoder_widths():
    encoder = MobileNetEncoder()
    feats = encoder(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(MobileNetEncoder.out_channels)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]  # strides 2, 4, 8, 16, 32
    decoder = CustomDecoder(decoder_channels=(16, 16, 8, 8))
    assert decoder(feats).shape == (1, 1, 64, 64)
    # Full 3×3 fusion at strides 16 and 8, depthwise + pointwise at strides 4 and 2.
    kinds = [type(stage.conv).__name__ for stage in decoder.stages]
    assert kinds == ["Conv2d", "Conv2d", "Sequential", "Sequential"]
    assert decoder.stages[3].conv[0].groups == 8 + 16  # depthwise over upsampled + skip
    with pytest.raises(ValueError, match="5 encoder and 4 decoder widths"):
        CustomDecoder(decoder_channels=(16, 8))


def _bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()
            if "running_" in k or "num_batches_tracked" in k}


def _train_step(model: torch.nn.Module) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(torch.rand(2, 3, 64, 64))
    out.float().mean().backward()
    opt.step()


def test_frozen_encoder_gets_no_updates_and_keeps_bn_stats():
    torch.manual_seed(0)
    model = MobileNetEncoderDecoder(freeze_encoder=True)
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_bn_before = _bn_stats(model.decoder)
    dec_w_before = model.decoder.head.weight.detach().clone()
    _train_step(model)
    assert model.training and not model.encoder.training
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_parameters())
    enc_after = model.encoder.state_dict()
    assert all(torch.equal(enc_before[k], enc_after[k]) for k in enc_before)  # weights and BN
    dec_bn_after = _bn_stats(model.decoder)
    assert any(not torch.equal(dec_bn_before[k], dec_bn_after[k]) for k in dec_bn_before)
    assert not torch.equal(dec_w_before, model.decoder.head.weight)


def test_unfreezing_trains_the_encoder_again():
    torch.manual_seed(0)
    model = MobileNetEncoderDecoder(freeze_encoder=True)
    model.set_encoder_frozen(False)
    assert not model.encoder_frozen
    bn_before = _bn_stats(model.encoder)
    _train_step(model)
    assert model.encoder.training
    assert all(p.requires_grad and p.grad is not None for p in model.encoder_parameters())
    assert any(not torch.equal(bn_before[k], v) for k, v in _bn_stats(model.encoder).items())
    model.set_encoder_frozen(True)
    model.train()
    assert model.encoder_frozen and not model.encoder.training


def test_full_torchvision_state_dict_file_loads(tmp_path):
    torch.manual_seed(1)
    state = mobilenet_v2(weights=None).state_dict()  # features.* and classifier.*
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(state, path)
    model = MobileNetEncoderDecoder(encoder_weights=str(path))
    assert _encoder_equal(model, state)


def test_encoder_only_and_wrapped_state_dicts_load(tmp_path):
    torch.manual_seed(2)
    features = mobilenet_v2(weights=None).features
    bare = tmp_path / "features.pt"
    torch.save(features.state_dict(), bare)  # keys like 0.0.weight
    expected = {f"features.{k}": v for k, v in features.state_dict().items()}
    assert _encoder_equal(MobileNetEncoderDecoder(encoder_weights=bare), expected)
    whole = tmp_path / "lesionseg_model.pt"  # a whole lesionseg model, DDP-prefixed and wrapped
    src = MobileNetEncoderDecoder()
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, whole)
    loaded = MobileNetEncoderDecoder(encoder_weights=whole)
    assert _encoder_equal(loaded, src.encoder.state_dict())


def test_bad_weight_files_are_clear_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth: encoder weights file not found"):
        MobileNetEncoderDecoder(encoder_weights=str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="garbage.pth: not a readable state-dict file"):
        MobileNetEncoderDecoder(encoder_weights=garbage)
    narrow = tmp_path / "narrow.pth"
    torch.save(mobilenet_v2(weights=None, width_mult=0.5).state_dict(), narrow)
    with pytest.raises(WeightsError, match="narrow.pth: not MobileNetV2 encoder weights: .*shape"):
        MobileNetEncoderDecoder(encoder_weights=narrow)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(WeightsError, match="other.pth: .*missing keys"):
        MobileNetEncoderDecoder(encoder_weights=other)
    assert issubclass(WeightsError, UserError)


def test_imagenet_without_cache_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        MobileNetEncoderDecoder(encoder_weights="imagenet")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert str(imagenet_cache_path()) in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/mobilenet_v2-" in message
    assert "state-dict file" in message and "\n" not in message


def test_imagenet_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    state = mobilenet_v2(weights=None).state_dict()
    cached = imagenet_cache_path()
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    model = MobileNetEncoderDecoder(encoder_weights="imagenet", freeze_encoder=True)
    assert _encoder_equal(model, state) and model.encoder_frozen


def test_checkpoint_round_trip(tmp_path, model):
    path = save_weights(tmp_path / "best.pt", model.state_dict(), Config())
    rebuilt, _, _ = build_model_from_checkpoint(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_checkpoint_model_is_built_without_weight_init_which_comes_back_after(tmp_path, model):
    """The rebuilt model skips initialising what the checkpoint overwrites; a checkpoint
    that does not fit is still an error, and torch's initialisers work again after both."""
    path = save_weights(tmp_path / "best.pt", model.eval().state_dict(), Config())
    rebuilt, _, _ = build_model_from_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(),
                                                 model.state_dict().values(), strict=True))
    wrong = save_weights(tmp_path / "wrong.pt", {"x": torch.zeros(1)}, Config())
    with pytest.raises(UserError, match="do not fit"):
        build_model_from_checkpoint(wrong)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    assert conv.weight.abs().sum() > 0 and torch.equal(conv.bias, conv.bias)
    t = torch.nn.init.ones_(torch.empty(2))
    assert torch.equal(t, torch.ones(2))
    assert "reset_parameters" not in torch.nn.Conv2d.__dict__


def test_weight_init_is_skipped_only_for_the_thread_that_builds(tmp_path, model) -> None:
    """Another thread that builds a layer while a checkpoint's model is being built gets
    initialised weights (the stand-ins call torch's own there)."""
    import threading

    from lesionseg import checkpoint

    other: list[torch.Tensor] = []
    with checkpoint._no_weight_init():
        t = threading.Thread(target=lambda: other.append(
            torch.nn.init.ones_(torch.nn.Conv2d(2, 3, 1).weight.detach().clone())))
        t.start()
        t.join(10)
        mine = torch.nn.init.ones_(torch.zeros(2))
    assert torch.equal(other[0], torch.ones(3, 2, 1, 1))
    assert torch.equal(mine, torch.zeros(2))  # this thread's initialisers did nothing


class _Touch:
    """Pickles as a call to Path.touch: a file that runs code when it is unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_checkpoints_load_through_the_plain_tensor_unpickler_without_running_code(
        tmp_path, model):
    """A checkpoint reads through load_plain_tensors (C unpickler, tensors and containers
    only) exactly as through torch's weights-only loader; a file that names anything else
    runs nothing there, and load_weights then answers as weights_only does: refused, or read
    when torch allows it (a torch.Size in the metadata)."""
    cfg = load_config(None, ["data.image_size=96", "optim.epochs=3"])
    path = save_weights(tmp_path / "best.pt", model.state_dict(), cfg, step=7,
                        postprocess={"threshold": 0.6, "steps": ["largest"]})
    fast = load_plain_tensors(path)
    slow = torch.load(path, map_location="cpu", weights_only=True)
    assert fast.keys() == slow.keys() and fast["config"] == slow["config"]
    assert fast["meta"] == slow["meta"] == {"step": 7, "postprocess": {
        "threshold": 0.6, "steps": ["largest"]}}
    assert all(torch.equal(fast["state_dict"][k], v) for k, v in slow["state_dict"].items())
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "lesionseg-checkpoint/2", "config": {}, "meta": {},
                "state_dict": {}, "x": _Touch(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError, match="not a plain tensor"):
        load_plain_tensors(evil)
    with pytest.raises(UserError, match="evil.pt: not a lesionseg checkpoint"):
        load_weights(evil)
    assert not marker.exists()
    sized = save_weights(tmp_path / "sized.pt", model.state_dict(), cfg, shape=torch.Size([2]))
    with pytest.raises(pickle.UnpicklingError):
        load_plain_tensors(sized)
    assert load_weights(sized)[2] == {"shape": torch.Size([2])}


def test_older_checkpoint_is_a_clear_error_and_its_encoder_still_loads(tmp_path, model):
    path = save_weights(tmp_path / "old.pt", model.state_dict(), Config())
    payload = torch.load(path, weights_only=True)
    payload["format"], payload["lesionseg_version"] = "lesionseg-checkpoint/1", "0.1.0"
    torch.save(payload, path)
    with pytest.raises(UserError, match=r"lesionseg 0\.1\.0 .*decoder differs.*retrain"):
        build_model_from_checkpoint(path)
    again = MobileNetEncoderDecoder(encoder_weights=path)  # the encoder part is unchanged
    assert torch.equal(again.encoder.features[0][0].weight, model.encoder.features[0][0].weight)


def test_torch_compile_traces_without_graph_breaks():
    torch.manual_seed(0)
    model = MobileNetEncoderDecoder(freeze_encoder=True)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.rand(1, 3, 64, 96)
    y = compiled(x)
    y.sum().backward()
    assert torch.allclose(y, model(x), atol=1e-5)


def test_ddp_forward_backward_with_frozen_encoder(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = MobileNetEncoderDecoder(freeze_encoder=True)
        ddp = DistributedDataParallel(model)
        ddp.train()
        assert not model.encoder.training
        ddp(torch.rand(2, 3, 64, 64)).mean().backward()
        assert model.decoder.head.weight.grad is not None
        assert all(p.grad is None for p in model.encoder_parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    model = MobileNetEncoderDecoder().cuda().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 257, 383, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        y = model(x)
    assert y.shape == (2, 1, 257, 383) and y.dtype == dtype
    y.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
