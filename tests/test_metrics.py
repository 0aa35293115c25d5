"""ISIC metrics on hand-made masks, every edge case of the official scorer included."""

from __future__ import annotations

import pytest
import torch

from lesionseg.metrics import METRIC_NAMES, binarize, confusion_counts, scores, summarize


def _mask(h: int, w: int, ones: int) -> torch.Tensor:
    """An h×w bool mask whose first `ones` pixels (row-major) are lesion."""
    m = torch.zeros(h * w, dtype=torch.bool)
    m[:ones] = True
    return m.view(h, w)


def _one(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    return {k: float(v[0]) for k, v in scores(confusion_counts(pred, truth)).items()}


def test_binarize_follows_the_isic_rule():
    x = torch.tensor([0, 1, 127, 128, 129, 255], dtype=torch.uint8)
    assert binarize(x).tolist() == [False, False, False, False, True, True]
    b = torch.tensor([True, False])
    assert binarize(b) is b
    assert binarize(torch.tensor([128, 200], dtype=torch.int32)).tolist() == [False, True]
    with pytest.raises(TypeError, match="threshold probabilities"):
        binarize(torch.tensor([0.7]))


def test_counts_on_a_hand_made_case():
    truth = torch.tensor([[1, 1, 0, 0],
                          [1, 1, 0, 0],
                          [0, 0, 0, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 0, 0, 0],
                         [1, 1, 1, 0],
                         [0, 0, 0, 1]], dtype=torch.bool)
    counts = confusion_counts(pred, truth)
    assert counts.dtype == torch.int64 and counts.tolist() == [[3, 2, 1, 6]]
    s = _one(pred, truth)
    assert s["accuracy"] == pytest.approx(9 / 12)
    assert s["jaccard"] == pytest.approx(3 / 6)
    assert s["dice"] == pytest.approx(6 / 9)
    assert s["sensitivity"] == pytest.approx(3 / 4)
    assert s["specificity"] == pytest.approx(6 / 8)
    assert s["threshold_jaccard"] == 0.0  # 0.5 < 0.65


def test_uint8_masks_are_binarized_at_128():
    truth = torch.tensor([[255, 0], [129, 128]], dtype=torch.uint8)
    pred = torch.tensor([[200, 255], [0, 0]], dtype=torch.uint8)
    assert confusion_counts(pred, truth).tolist() == [[1, 1, 1, 1]]


def test_empty_truth_and_empty_prediction_is_perfect():
    empty = torch.zeros(5, 5, dtype=torch.bool)
    s = _one(empty, empty)
    assert s == {name: 1.0 for name in METRIC_NAMES}


def test_empty_truth_with_a_prediction():
    s = _one(_mask(5, 5, 5), torch.zeros(5, 5, dtype=torch.bool))
    assert s["jaccard"] == 0.0 and s["dice"] == 0.0 and s["threshold_jaccard"] == 0.0
    assert s["sensitivity"] == 1.0  # no lesion pixel in the truth: the scorer's freebie
    assert s["specificity"] == pytest.approx(20 / 25)
    assert s["accuracy"] == pytest.approx(20 / 25)


def test_all_lesion_truth():
    full = torch.ones(4, 4, dtype=torch.bool)
    s = _one(full, full)
    assert s == {name: 1.0 for name in METRIC_NAMES}  # specificity 1: no background pixel
    s = _one(torch.zeros(4, 4, dtype=torch.bool), full)
    assert s["sensitivity"] == 0.0 and s["specificity"] == 1.0
    assert s["jaccard"] == 0.0 and s["dice"] == 0.0 and s["accuracy"] == 0.0


def test_lesion_missed_entirely():
    s = _one(torch.zeros(4, 4, dtype=torch.bool), _mask(4, 4, 4))
    assert s["sensitivity"] == 0.0 and s["specificity"] == 1.0 and s["jaccard"] == 0.0


def test_threshold_jaccard_boundary():
    # tp = 13, fp + fn = 7 → Jaccard exactly 0.65: kept (≥ 0.65).
    kept = torch.tensor([[13, 4, 3, 0]])
    # tp = 16, fp = 9 → Jaccard 0.64: zeroed.
    dropped = torch.tensor([[16, 9, 0, 0]])
    s_kept, s_dropped = scores(kept), scores(dropped)
    assert s_kept["jaccard"].item() == 0.65 and s_kept["threshold_jaccard"].item() == 0.65
    assert s_dropped["jaccard"].item() == pytest.approx(0.64)
    assert s_dropped["threshold_jaccard"].item() == 0.0


def test_shapes_accepted_and_batched():
    truth = torch.stack([_mask(4, 6, 6), _mask(4, 6, 0), _mask(4, 6, 24)])
    pred = torch.stack([_mask(4, 6, 3), _mask(4, 6, 2), _mask(4, 6, 24)])
    counts = confusion_counts(pred, truth)
    assert counts.shape == (3, 4)
    assert torch.equal(confusion_counts(pred[:, None], truth[:, None]), counts)
    assert torch.equal(confusion_counts(pred[1], truth[1]), counts[1:2])
    assert counts.sum(dim=1).tolist() == [24, 24, 24]
    per_image = scores(counts)
    assert all(v.dtype == torch.float64 and v.shape == (3,) for v in per_image.values())
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_counts(pred, truth[:, :3])
    with pytest.raises(ValueError, match="expected"):
        confusion_counts(pred[:, None].expand(3, 2, 4, 6), truth[:, None].expand(3, 2, 4, 6))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        scores(counts[:, :3])


def test_summarize_is_a_macro_average():
    # A big image scored 1 and a tiny one scored 0: macro mean 0.5, a pooled Jaccard would be ≈ 1.
    big = confusion_counts(_mask(10, 10, 50), _mask(10, 10, 50))
    small = confusion_counts(_mask(2, 2, 0), _mask(2, 2, 1))
    summary = summarize(torch.cat([big, small]))
    assert summary["images"] == 2
    assert summary["jaccard"] == pytest.approx(0.5)
    assert summary["dice"] == pytest.approx(0.5)
    assert summary["sensitivity"] == pytest.approx(0.5)
    assert set(summary) == {*METRIC_NAMES, "images"}
    assert all(isinstance(v, float) for k, v in summary.items() if k != "images")


def test_summarize_of_nothing():
    summary = summarize(torch.zeros(0, 4, dtype=torch.long))
    assert summary["images"] == 0
    assert all(summary[name] != summary[name] for name in METRIC_NAMES)  # NaN


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors():
    truth = torch.stack([_mask(4, 6, 6), _mask(4, 6, 0)]).cuda()
    pred = torch.stack([_mask(4, 6, 3), _mask(4, 6, 0)]).cuda()
    counts = confusion_counts(pred, truth)
    assert counts.is_cuda
    assert torch.equal(counts.cpu(), confusion_counts(pred.cpu(), truth.cpu()))
    assert scores(counts)["jaccard"].is_cuda
    assert summarize(counts)["jaccard"] == pytest.approx(0.75)


def test_binary_counts_equal_confusion_counts():
    """The inference job's cv2 counting (uint8, 0 = background, nonzero = lesion) gives the
    counts of `confusion_counts` on the bool masks, whatever the nonzero values."""
    import numpy as np

    from lesionseg.metrics import binary_counts

    rng = np.random.default_rng(0)
    for h, w, p_pred, p_true in ((1, 1, 0.5, 0.5), (7, 13, 0.0, 0.0), (7, 13, 1.0, 1.0),
                                 (7, 13, 0.0, 1.0), (64, 97, 0.3, 0.6), (301, 257, 0.5, 0.05)):
        pred = rng.random((h, w)) < p_pred
        truth = rng.random((h, w)) < p_true
        expect = tuple(confusion_counts(torch.from_numpy(pred), torch.from_numpy(truth))[0].tolist())
        as_255, as_01 = pred.astype(np.uint8) * 255, truth.astype(np.uint8)
        assert binary_counts(as_255, as_01) == expect
        odd = rng.integers(1, 256, (h, w), dtype=np.uint8) * pred  # any nonzero value is lesion
        assert binary_counts(odd, truth.astype(np.uint8) * 7) == expect
        assert sum(expect) == h * w


def test_binary_counts_refuse_other_inputs():
    import numpy as np

    from lesionseg.metrics import binary_counts

    a = np.zeros((4, 5), np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        binary_counts(a.astype(bool), a)
    with pytest.raises(ValueError, match="shape"):
        binary_counts(a, np.zeros((5, 4), np.uint8))


def test_a_checkpoint_is_degenerate_by_its_stored_val_share_unless_tuning_chose():
    from lesionseg.metrics import degenerate_checkpoint

    assert degenerate_checkpoint({}) is None  # nothing stored: nothing claimed
    assert "almost no lesion" in degenerate_checkpoint({"val": {"pred_fraction": 0.001}})
    assert degenerate_checkpoint({"val": {"pred_fraction": 0.2}}) is None
    assert degenerate_checkpoint({"val": {"pred_fraction": 0.001},
                                  "postprocess": {"threshold": 0.1}}) is None


def test_degenerate_names_an_empty_or_full_model_and_passes_a_working_one():
    from lesionseg.metrics import degenerate, predicted_fraction

    empty = torch.tensor([[0, 0, 30, 70], [0, 0, 10, 90]])  # tp fp fn tn: nothing predicted
    full = torch.tensor([[30, 70, 0, 0], [10, 90, 0, 0]])
    fair = torch.tensor([[25, 5, 5, 65], [8, 2, 2, 88]])
    assert predicted_fraction(empty) == 0 and predicted_fraction(full) == 1
    assert "almost no lesion" in degenerate(predicted_fraction(empty))
    assert "almost everywhere" in degenerate(predicted_fraction(full))
    assert degenerate(predicted_fraction(fair)) is None
    assert degenerate(None) is None and degenerate(float("nan")) is None
