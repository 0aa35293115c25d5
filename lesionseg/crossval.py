"""Cross-validation: out-of-fold predictions and their evaluation (`lesionseg cv` runs it from
lesionseg/commands/cv.py).

A cross-validation run folder `runs/<name>/` holds one training run per fold, `fold-I/`
(lesionseg.data.folds says which cases each fold holds out). When fold I has trained, its
best.pt predicts the cases it held out, as `jobs/infer.py` predicts by default (flip TTA,
fp32, at the stored size: lesionseg.tuning.val_probabilities); the probabilities (8-bit) and
truths go to `fold-I/oof.npz`. When every fold has one, `evaluate` pools them, so that every
train + val case is predicted exactly once by the one model that did not train on it:

- the threshold and post-processing are chosen on the pooled predictions
  (lesionseg.postprocess.choose) and stored in every fold's best.pt, where inference (one fold,
  or the fold ensemble `--checkpoint runs/<name>`) finds them;
- `cv/metrics.csv` (one row per case: fold, the ISIC scores at the chosen setting, counts),
  `cv/masks/` (the out-of-fold masks at the stored size), `cv/summary.json` (pooled and
  per-fold means, the spread of the fold means, the choice) and `cv/report.html`;
- with W&B, a run of job type "cross-validation" in the folds' group holds the summary.
"""

from __future__ import annotations

import contextlib
import fcntl
import html
import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesionseg.checkpoint import load_weights, save_weights
from lesionseg.config import Config, load_config
from lesionseg.data.folds import FOLD_DIR_PREFIX, fold_dir
from lesionseg.data.images import write_mask
from lesionseg.errors import UserError
from lesionseg.files import atomic_write_bytes, atomic_write_text, sha256_file
from lesionseg.infer.merge import ERROR_COLUMNS, with_scores, write_csv
from lesionseg.metrics import METRIC_NAMES, binary_counts, summarize
from lesionseg.modelcard import write_run_card
from lesionseg.postprocess import DEFAULT_THRESHOLD, Postprocess
from lesionseg.report import write_report
from lesionseg.tracking import log_cross_validation
from lesionseg.tuning import store_choice, val_probabilities

log = logging.getLogger(__name__)

OOF_FILE = "oof.npz"  # in each fold folder: its held-out cases' probabilities and truths
CV_DIR = "cv"  # in the run folder: metrics.csv, summary.json, report.html, masks/
LOCK_FILE = ".cv.lock"  # in the run folder: one evaluation at a time (array tasks finish together)
CV_COLUMNS = ("id", "fold", "height", "width", "dice", "iou", "accuracy", "sensitivity",
              "specificity", "threshold_jaccard", "tp", "fp", "fn", "tn", "status", "mask",
              "pred_area", "pred_fraction")


class CrossValidationError(UserError):
    """A cross-validation folder that cannot be evaluated (names the folder or fold)."""


# --------------------------------------------------------------------------- out-of-fold files


@dataclass
class OutOfFold:
    """One fold's predictions of the cases it held out: 8-bit probabilities and 0/1 truths at
    the stored size, and what produced them (`meta`: fold, folds, fold_seed, checkpoint sha256,
    the held-out count)."""

    ids: list[str]
    probs: list[np.ndarray]  # uint8, round(probability × 255)
    truths: list[np.ndarray]  # uint8 0/1
    meta: dict[str, Any]


def predict_held_out(run_dir: Path, cfg: Config, val_urls: tuple[str, ...],
                     held_out: frozenset[str], device: torch.device | None = None) -> OutOfFold:
    """Predict fold `cfg.data.fold`'s held-out cases with its best.pt, write `oof.npz` and,
    with train.tune_postprocess, store the fold's own choice in best.pt (replaced by the pooled
    one when every fold is done)."""
    best = run_dir / "best.pt"
    ids, probs, truths = val_probabilities(best, val_urls, cfg.data.image_size, device=device,
                                           ids=held_out)
    if set(ids) != held_out:
        log.warning("fold %s: predicted %d of its %d held-out cases (unreadable samples?)",
                    cfg.data.fold, len(set(ids)), len(held_out))
    if cfg.train.tune_postprocess and probs:
        store_choice([best], probs, truths, f"held-out cases of fold {cfg.data.fold}",
                     cfg.train.tune_min_images)
    meta = {"fold": int(cfg.data.fold), "folds": cfg.data.folds, "fold_seed": cfg.data.fold_seed,
            "shards": str(Path(cfg.data.shards).resolve()) if cfg.data.shards else None,
            "held_out": len(held_out), "image_size": cfg.data.image_size,
            "checkpoint_sha256": sha256_file(best)}
    oof = OutOfFold(ids, [quantize(p) for p in probs], [t.astype(np.uint8) for t in truths], meta)
    save_oof(run_dir / OOF_FILE, oof)
    return oof


def quantize(prob: np.ndarray) -> np.ndarray:
    """A probability map as uint8 round(p × 255), as `infer --save-probs` writes it."""
    return np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)


def save_oof(path: Path, oof: OutOfFold) -> Path:
    """Write an OutOfFold as one compressed .npz (flat arrays and shapes; atomically)."""
    shapes = np.array([p.shape for p in oof.probs], dtype=np.int64).reshape(-1, 2)
    buf = io.BytesIO()
    np.savez_compressed(
        buf, ids=np.array(oof.ids, dtype=str), shapes=shapes,
        probs=np.concatenate([p.ravel() for p in oof.probs]) if oof.probs else np.zeros(0, np.uint8),
        truths=np.packbits(np.concatenate([t.ravel() for t in oof.truths])) if oof.truths
        else np.zeros(0, np.uint8),
        meta=np.array(json.dumps(oof.meta)))
    return atomic_write_bytes(path, buf.getvalue())


def load_oof(path: Path) -> OutOfFold:
    """Read `save_oof`'s file; a damaged one is a CrossValidationError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, shapes = [str(i) for i in z["ids"]], z["shapes"]
            flat, bits, meta = z["probs"], z["truths"], json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise CrossValidationError(f"{path}: unreadable out-of-fold file ({e}); rerun that "
                                   "fold's training command to write it again") from None
    sizes = [int(h * w) for h, w in shapes]
    truths_flat = np.unpackbits(bits, count=sum(sizes))
    probs, truths, at = [], [], 0
    for (h, w), n in zip(shapes, sizes, strict=True):
        probs.append(flat[at:at + n].reshape(h, w))
        truths.append(truths_flat[at:at + n].reshape(h, w))
        at += n
    return OutOfFold(ids, probs, truths, meta)


# --------------------------------------------------------------------------- the folds of a run


def run_folds(root: Path) -> int:
    """The number of folds of the cross-validation in `root` (data.folds of its folds'
    config.yaml); CrossValidationError when there is none."""
    for path in sorted(root.glob(f"{FOLD_DIR_PREFIX}*/config.yaml")):
        with contextlib.suppress(UserError):
            return load_config(path).data.folds
    raise CrossValidationError(f"{root}: no {FOLD_DIR_PREFIX}I/config.yaml in it (not a "
                               "cross-validation run folder; train with data.folds=K)")


def missing_folds(root: Path, folds: int) -> list[int]:
    """Folds without their out-of-fold file yet."""
    return [i for i in range(folds) if not (fold_dir(root, i) / OOF_FILE).is_file()]


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold the run folder's evaluation lock (two array tasks may finish at once)."""
    with open(root / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def evaluate_when_complete(root: Path, cfg: Config) -> dict[str, Any] | None:
    """`evaluate` if every fold has its out-of-fold file, else log which are missing."""
    missing = missing_folds(root, cfg.data.folds)
    if missing:
        log.info("cross-validation %s: fold(s) %s not finished yet; the last fold to finish "
                 "writes %s/ (or run `lesionseg cv %s`)", root, ", ".join(map(str, missing)),
                 root / CV_DIR, root)
        return None
    return evaluate(root)


# --------------------------------------------------------------------------- evaluation


def _check_folds(root: Path, oofs: list[OutOfFold]) -> None:
    """Every fold of one cross-validation, each case once: refuse anything else."""
    first = oofs[0].meta
    for i, oof in enumerate(oofs):
        for key in ("folds", "fold_seed", "shards"):
            if oof.meta.get(key) != first.get(key):
                raise CrossValidationError(
                    f"{fold_dir(root, i) / OOF_FILE}: {key}={oof.meta.get(key)} but fold 0 has "
                    f"{first.get(key)}; retrain the folds with the same settings")
        if oof.meta.get("fold") != i:
            raise CrossValidationError(f"{fold_dir(root, i) / OOF_FILE}: holds fold "
                                       f"{oof.meta.get('fold')}, not {i}")
    seen: dict[str, int] = {}
    for i, oof in enumerate(oofs):
        for case_id in oof.ids:
            if case_id in seen:
                raise CrossValidationError(f"{root}: case {case_id} was held out by folds "
                                           f"{seen[case_id]} and {i}; retrain them")
            seen[case_id] = i


def _rows(oofs: list[OutOfFold], post: Postprocess) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """One row per case (fold, size, counts and scores with `post`) and the (N, 4) counts."""
    rows = []
    for fold, oof in enumerate(oofs):
        for case_id, prob, truth in zip(oof.ids, oof.probs, oof.truths, strict=True):
            mask = post_mask(prob, post)
            c = binary_counts(mask, truth)
            h, w = truth.shape
            rows.append({"id": case_id, "fold": fold, "split": f"fold {fold}", "height": h,
                         "width": w, "status": "ok", "tp": c[0], "fp": c[1], "fn": c[2],
                         "tn": c[3], "pred_area": int(np.count_nonzero(mask)),
                         "pred_fraction": round(float(np.count_nonzero(mask)) / (h * w), 6),
                         "mask": f"masks/{case_id}_Segmentation.png", "_mask": mask})
    return with_scores(rows)  # the six ISIC scores per row, as the inference job adds them


def post_mask(prob8: np.ndarray, post: Postprocess) -> np.ndarray:
    """The uint8 0/255 mask of an 8-bit probability map: probability > threshold, then the
    post-processing steps and the empty-mask fallback (the comparison done on p / 255 in
    float32, as inference compares)."""
    return post.mask(prob8.astype(np.float32) / np.float32(255))


def _means(counts: torch.Tensor) -> dict[str, float]:
    means = summarize(counts)
    means["iou"] = means["jaccard"]
    return means


def _spread(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation, min and max of each score's fold means."""
    out = {}
    for name in (*METRIC_NAMES, "iou"):
        values = np.array([f["means"][name] for f in per_fold], dtype=np.float64)
        out[name] = {"mean": float(values.mean()),
                     "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                     "min": float(values.min()), "max": float(values.max())}
    return out


def evaluate(root: str | Path, store: bool | None = None, log_wandb: bool = True) -> dict[str, Any]:
    """Pool the out-of-fold predictions of every fold under `root`: choose the threshold and
    post-processing on them (stored in every fold's best.pt when `store`, by default when the
    folds' train.tune_postprocess is on), write `cv/` and return its summary."""
    root = Path(root)
    folds = run_folds(root)
    missing = missing_folds(root, folds)
    if missing:
        raise CrossValidationError(
            f"{root}: fold(s) {', '.join(map(str, missing))} of {folds} have no {OOF_FILE} yet "
            f"(train them: data.folds={folds} data.fold=I, or data.fold=all)")
    with _locked(root):
        oofs = [load_oof(fold_dir(root, i) / OOF_FILE) for i in range(folds)]
        _check_folds(root, oofs)
        cfg = load_config(fold_dir(root, 0) / "config.yaml")
        checkpoints = [fold_dir(root, i) / "best.pt" for i in range(folds)]
        store = cfg.train.tune_postprocess if store is None else store
        probs = [p for oof in oofs for p in oof.probs]
        truths = [t for oof in oofs for t in oof.truths]
        choice = None
        if store:
            # choose() compares p > t: give it the 8-bit maps as post_mask reads them. None:
            # no choice claimed (a degenerate model, too few cases): the defaults apply.
            choice = store_choice(checkpoints, [p.astype(np.float32) / np.float32(255)
                                                for p in probs], truths,
                                  f"pooled out-of-fold predictions of {folds} folds",
                                  cfg.train.tune_min_images)
        # scored as inference will apply it: with the empty-mask fallback of infer
        chosen = replace(choice or Postprocess(), fallback=cfg.infer.empty_fallback)
        summary = _write_outputs(root, oofs, chosen, checkpoints, cfg, stored=store,
                                 choice_stored=choice is not None)
    log.info("cross-validation %s: %d cases out of fold, Dice %.4f (folds %.4f ± %.4f), "
             "Jaccard %.4f (folds %.4f ± %.4f) at threshold %g, %s; written to %s", root,
             summary["cases"], summary["means"]["dice"], summary["spread"]["dice"]["mean"],
             summary["spread"]["dice"]["std"], summary["means"]["jaccard"],
             summary["spread"]["jaccard"]["mean"], summary["spread"]["jaccard"]["std"],
             chosen.threshold, chosen.name, root / CV_DIR)
    if log_wandb and cfg.tracking.backend == "wandb":
        log_cross_validation(root, summary, cfg)
    return summary


def _write_outputs(root: Path, oofs: list[OutOfFold], chosen: Postprocess,
                   checkpoints: list[Path], cfg: Config, stored: bool,
                   choice_stored: bool) -> dict[str, Any]:
    """cv/metrics.csv, cv/masks/, cv/summary.json and cv/report.html. `stored`: the folds'
    best.pt get the out-of-fold scores; `choice_stored`: and a threshold/post-processing
    choice (tuning may refuse to claim one)."""
    out = root / CV_DIR
    rows, counts = _rows(oofs, chosen)
    default = Postprocess(fallback=chosen.fallback)
    _, default_counts = _rows(oofs, default) if chosen != default else (rows, counts)
    for row in rows:
        write_mask(out / "masks" / f"{row['id']}_Segmentation.png", row.pop("_mask"))
    per_fold = []
    for fold, (oof, ckpt) in enumerate(zip(oofs, checkpoints, strict=True)):
        mine = torch.tensor([[r["tp"], r["fp"], r["fn"], r["tn"]] for r in rows
                             if r["fold"] == fold], dtype=torch.int64).reshape(-1, 4)
        per_fold.append({"fold": fold, "images": int(mine.shape[0]),
                         "held_out": oof.meta.get("held_out"), "means": _means(mine),
                         "checkpoint": str(ckpt.resolve())})
    rows.sort(key=lambda r: r["id"])
    summary = {
        "complete": True, "folds": len(oofs), "fold_seed": oofs[0].meta.get("fold_seed"),
        "shards": oofs[0].meta.get("shards"), "cases": len(rows),
        "image_size": cfg.data.image_size,
        "scored_at": "the stored (packed) size, at most 1024 px a side; masks at the original "
                     "size are scored by jobs/infer.py",
        "tta": True, "threshold": chosen.threshold, "postprocess": chosen.name,
        "empty_fallback": chosen.fallback,
        "postprocess_stored": choice_stored, "oof_stored": stored,
        "means": _means(counts), "means_default": _means(default_counts),
        "spread": _spread(per_fold), "per_fold": per_fold,
        "errors": 0, "failures": [], "scored": len(rows), "masks_written": len(rows),
        "checkpoint": {"path": str(root.resolve()), "members": []},
        "config": {"infer": {"report_images": 0}},
    }
    if stored:
        _store_summary(checkpoints, summary)
    for fold, ckpt in zip(per_fold, checkpoints, strict=True):  # as they are now
        fold["sha256"] = sha256_file(ckpt)
        summary["checkpoint"]["members"].append({"path": fold["checkpoint"],
                                                 "sha256": fold["sha256"]})
    write_csv(out / "metrics.csv", CV_COLUMNS, rows)
    # Every case is read from a fold's oof.npz (a bad one stops the evaluation), so no input
    # fails; the report's counts link errors.csv, which says so with its header alone.
    write_csv(out / "errors.csv", ERROR_COLUMNS, [])
    atomic_write_text(out / "summary.json", json.dumps(_finite(summary), indent=1) + "\n")
    write_report(out / "report.html", summary, rows, out / "thumbs", limit=0,
                 title="Cross-validation report", extra=_fold_table(summary))
    return summary


def _store_summary(checkpoints: list[Path], summary: dict[str, Any]) -> None:
    """Each fold's best.pt gets the out-of-fold scores (`meta["oof"]`: pooled, and its own
    fold's) and a fresh MODEL_CARD.md that shows them with the pooled choice."""
    names = ("dice", "jaccard", "threshold_jaccard")
    for ckpt, fold in zip(checkpoints, summary["per_fold"], strict=True):
        state_dict, cfg, meta = load_weights(ckpt)
        meta["oof"] = {"folds": summary["folds"], "cases": summary["cases"],
                       "threshold": summary["threshold"], "postprocess": summary["postprocess"],
                       "pooled": {k: round(summary["means"][k], 5) for k in names},
                       f"fold_{fold['fold']}": {k: round(fold["means"][k], 5) for k in names}}
        save_weights(ckpt, state_dict, cfg, **meta)
        write_run_card(ckpt.parent)


def _finite(value: Any) -> Any:
    """NaN → None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fold_table(summary: dict[str, Any]) -> str:
    """The report's per-fold section: each fold's means, then their spread."""
    names = (("dice", "Dice"), ("jaccard", "Jaccard"), ("threshold_jaccard", "thr. Jaccard"),
             ("sensitivity", "sens."), ("specificity", "spec."))
    head = "".join(f'<th class="n">{label}</th>' for _, label in names)
    body = "".join(
        f'<tr><th>fold {f["fold"]}</th><td class="n">{f["images"]}</td>'
        + "".join(f'<td class="n">{f["means"][k]:.4f}</td>' for k, _ in names) + "</tr>"
        for f in summary["per_fold"])
    spread = summary["spread"]
    body += ('<tr><th>folds: mean ± std</th><td></td>'
             + "".join(f'<td class="n">{spread[k]["mean"]:.4f} ± {spread[k]["std"]:.4f}</td>'
                       for k, _ in names) + "</tr>")
    body += ('<tr><th>pooled</th><td class="n">' + str(summary["cases"]) + "</td>"
             + "".join(f'<td class="n">{summary["means"][k]:.4f}</td>' for k, _ in names)
             + "</tr>")
    default = summary["means_default"]
    note = (f"At threshold {DEFAULT_THRESHOLD} without post-processing the pooled Dice is "
            f"{default['dice']:.4f}, Jaccard {default['jaccard']:.4f}.")
    return (f"<h2>Folds ({summary['folds']})</h2><p>Every case is predicted once, by the fold "
            f"model that did not train on it. {html.escape(note)}</p>"
            f'<table><tr><th></th><th class="n">cases</th>{head}</tr>{body}</table>')
