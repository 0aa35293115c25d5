"""The report: every ratio with its target (`RATIOS`), whether it is met, and the printed
table."""

from __future__ import annotations

from typing import Any

from lesionseg.bench.measure import rounded

# Ratio name -> (case, comparison, target, explanation). Scripts read the names at top level.
RATIOS: dict[str, tuple[str, str, float, str]] = {
    "data_speedup_vs_folder": ("data", ">=", 10.0,
                               "shard pipeline images/s ÷ folder loader images/s (one worker)"),
    "train_speedup_vs_smp": ("train", ">=", 2.5,
                             "smp U-Net step time ÷ our step time (fp32, trainable, best layout)"),
    "train_loop_over_pure_step": ("train", "<=", 1.15,
                                  "real loop step time ÷ pure step time (same model and batch)"),
    # This bench measures on the CPU, where the job's CPU stages share the cores with the
    # forward: ≥ 2 here; a GPU host's targets (≥ 3, ≤ 1.3) are jobs/gpucheck.py's.
    "infer_speedup_vs_naive": ("infer", ">=", 2.0,
                               "batch job images/s ÷ naive loop images/s (CPU; ≥ 3 on a GPU)"),
    "infer_over_pure_forward": ("infer", "<=", 1.3,
                                "batch job time ÷ pure batched forward time (same images; a GPU "
                                "host's target: on a CPU the job's CPU stages share the cores)"),
    "infer_efficiency": ("infer", ">=", 0.85,
                         "ideal time (pure forward + the job's per-image CPU stages spread over "
                         "the cores) ÷ the job's loop time"),
    "infer_wall_over_loop": ("infer", "<=", 1.1,
                             "the job's wall time (start to report written) ÷ its loop time"),
    "accuracy_margin_vs_plain": ("accuracy", ">=", 0.01,
                                 "our test Dice − the plain script's, hard data, equal epochs"),
    "accuracy_margin_vs_smp": ("accuracy", ">=", 0.02,
                               "our test Dice − smp U-Net's (plain script), equal epochs"),
    "accuracy_time_margin_vs_plain": ("accuracy", ">", 0.0,
                                      "our test Dice − the plain script's, equal wall time"),
    "accuracy_time_margin_vs_smp": ("accuracy", ">", 0.0,
                                    "our test Dice − smp U-Net's, equal wall time"),
    # The real case (accuracy --real DIR): real ISIC 2016 test images, 30 epochs at 128².
    "real_margin_vs_plain": ("accuracy", ">=", 0.01,
                             "our real test Dice − the plain script's, equal epochs"),
    "real_margin_vs_smp": ("accuracy", ">=", 0.02,
                           "our real test Dice − smp U-Net's (plain script), equal epochs"),
    "real_jaccard_ours": ("accuracy", ">=", 0.87, "our real test Jaccard (official scorer)"),
    "real_worst10_ours": ("accuracy", ">=", 0.78,
                          "mean Dice of our worst tenth of the real test images"),
    "real_worst10_margin_vs_plain": ("accuracy", ">=", 0.03,
                                     "our worst-tenth mean Dice − the plain script's"),
    # The review flags on the same real test images (lesionseg.quality; means over the seeds).
    "real_review_auroc": ("accuracy", ">=", 0.92,
                          "AUROC of our uncertainty for the real test images below Dice 0.8"),
    "real_review_flagged": ("accuracy", "<=", 0.15,
                            "share of our real test images flagged needs_review"),
    "real_review_caught": ("accuracy", ">=", 0.8,
                           "share of our real test images below Dice 0.8 that are flagged"),
    "real_review_dice_mae": ("accuracy", "<=", 0.06,
                             "mean |expected_dice − true Dice| on our real test images"),
}
# Top-level test Dice of each trainer in the accuracy case (equal epochs), no target alone.
ACCURACY_KEYS = ("accuracy_dice_ours", "accuracy_dice_smp", "accuracy_dice_plain",
                 *(f"real_{k}_{n}" for k in ("dice", "jaccard", "worst10", "below_half")
                   for n in ("ours", "plain", "smp")))


def target_table(doc: dict[str, Any]) -> dict[str, Any]:
    """Each ratio with its target and whether it is met (None when not measured)."""
    table = {}
    for name, (_, op, target, what) in RATIOS.items():
        value = doc.get(name)
        met = None if value is None else {">=": value >= target, ">": value > target,
                                          "<=": value <= target}[op]
        table[name] = {"value": value, "target": f"{op} {target:g}", "met": met, "what": what}
    race = doc.get("cases", {}).get("train", {}).get("race", {})
    if "ours" in race:
        ours, peer = race["ours"]["val_dice"], race.get("smp", {}).get("val_dice")
        table["train_race_val_dice"] = {
            "value": {"ours": ours, "smp": peer}, "target": "ours >= smp",
            "met": None if peer is None else ours >= peer,
            "what": f"val Dice after {race['budget_s']:g} s of training each at "
                    f"{race['image_size']}²"}
    return table


def format_value(value: Any, unit: str = "") -> str:
    """A figure for the printed tables: 3 significant digits, whole numbers from 100."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"
    return f"{value}{unit}"


def table_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(case, measurement, median, spread/notes) rows of the printed table."""
    rows: list[tuple[str, str, str, str]] = []
    cases = doc.get("cases", {})
    if "data" in cases:
        d = cases["data"]
        for key, label in (("shards_images_per_s", "shard pipeline"),
                           ("folder_images_per_s", "folder loader (full decode)")):
            s = d[key]
            rows.append(("data", f"{label}, img/s/worker", format_value(s["median"]),
                         f"{format_value(s['min'])}-{format_value(s['max'])}"))
        for key, s in d.items():
            if key.startswith("shards_max_side_"):
                side = key.split("_")[3]
                rows.append(("data", f"shard pipeline, stored at {side} px, img/s/worker",
                             format_value(s["median"]), f"{format_value(s['min'])}-{format_value(s['max'])}"))
        st = d["stages_ms_per_image"]
        rows.append(("data", "ms/img decode + transform: shards", format_value(st["shard_decode_ms"]),
                     f"+ {format_value(st['shard_transform_ms'])}"))
        rows.append(("data", "ms/img decode + transform: folder", format_value(st["folder_decode_ms"]),
                     f"+ {format_value(st['folder_transform_ms'])}"))
        rows.append(("data", "packing, cases/s", format_value(d["pack_cases_per_s"]),
                     f"{d['pack_workers']} workers"))
    if "train" in cases:
        t = cases["train"]
        for name, s in t["step_s"].items():
            rows.append(("train", f"step {name}, s", format_value(s["median"]),
                         f"{format_value(s['min'])}-{format_value(s['max'])}"))
        lp = t["loop"]
        rows.append(("train", "pure step (train_step, pre-made), s",
                     format_value(lp["pure_step_s"]["mean"]), f"median {format_value(lp['pure_step_s']['median'])}"))
        rows.append(("train", f"real loop ({lp['num_workers']} workers), s",
                     format_value(lp["loop_step_s"]["mean"]), f"median {format_value(lp['loop_step_s']['median'])}"))
        race = t["race"]
        for name in ("ours", "smp"):
            if name in race:
                r = race[name]
                rows.append(("train", f"race {name}: val Dice after {race['budget_s']:g} s "
                             f"at {race['image_size']}²", format_value(r["val_dice"]),
                             f"{r['steps']} steps"))
        for name, c in t["model"].items():
            gm = next(v for k, v in c.items() if k.startswith("gmacs_"))
            rows.append(("train", f"{name}: params (trainable), GMACs", f"{c['params'] / 1e6:.2f} M",
                         f"({c['trainable_params'] / 1e6:.2f} M), {format_value(gm)} GMAC"))
    if "infer" in cases:
        i = cases["infer"]
        rows.append(("infer", "batch job, img/s", format_value(i["job_images_per_s"]),
                     f"wall incl. start-up {format_value(i['job_wall_images_per_s'])}"))
        rows.append(("infer", "naive loop, img/s", format_value(i["naive_images_per_s"]), ""))
        rows.append(("infer", f"pure forward batch {i['batch_size']}, img/s",
                     format_value(i["forward_images_per_s"]), i.get("precision", "")))
        if i.get("forward_fp32_s"):
            rows.append(("infer", f"pure forward batch {i['batch_size']}, fp32, img/s",
                         format_value(rounded(i["images"] / i["forward_fp32_s"]["median"])), ""))
        if i.get("job_threads"):
            th = i["job_threads"]
            rows.append(("infer", "job threads: torch / decode workers / finishing",
                         f"{th['torch_threads']} / {th['decode_workers']} / "
                         f"{th['finish_threads']}", f"on {th['cores']} cores"))
        if i.get("forward_onnxruntime_images_per_s"):
            rows.append(("infer", f"pure forward batch {i['batch_size']}, onnxruntime, img/s",
                         format_value(i["forward_onnxruntime_images_per_s"]), "same batches, uint8 in"))
        st = i["stages_ms_per_image"]
        rows.append(("infer", "ms/img on 1 core: decode_item + finish_item",
                     format_value(st["decode_item_ms"]), f"+ {format_value(st['finish_item_ms'])}"))
    if "accuracy" in cases:
        a = cases["accuracy"]
        for label, group in (("equal epochs", "equal_epochs"), ("equal time", "equal_time")):
            for name, r in a[group].items():
                if group == "equal_time" and name == "ours":
                    continue
                rows.append(("accuracy", f"{name}, {label}: test Dice / Jaccard at "
                             f"{a['image_size']}²", f"{format_value(r['dice'])} / {format_value(r['jaccard'])}",
                             _training(r)))
                q = r.get("review") if name == "ours" and group == "equal_epochs" else None
                if q:
                    rows.append(("accuracy", "ours: review AUROC (Dice<0.8) / flagged / caught / "
                                 f"exp. Dice MAE{_seeds(q)}", *_review_cells(q)))
                    rows.append(("accuracy", f"ours: val pixel ECE before / after temperature{_seeds(q)}",
                                 f"{format_value(q['ece_before'])} / {format_value(q['ece_after'])}",
                                 f"T = {format_value(q['temperature'])}"))
    for name, r in cases.get("accuracy", {}).get("real", {}).get("trainers", {}).items():
        rows.append(("accuracy", f"{name}, real ISIC test: Dice / Jaccard / worst-tenth Dice "
                     "/ images < 0.5", f"{format_value(r['dice'])} / {format_value(r['jaccard'])}"
                     f" / {format_value(r['worst10_dice'])} / {format_value(r['below_half'])}",
                     _training(r)))
        margin = cases.get("accuracy", {}).get("real", {}).get("margins", {}).get(name)
        if margin:
            rows.append(("accuracy", f"ours − {name}, real, each seed's Dice",
                         " / ".join(f"{d:+.4f}" for d in margin["dice"]),
                         "worst tenth " + " / ".join(f"{d:+.3f}" for d in margin["worst10_dice"])))
        q = r.get("review") if name == "ours" else None
        if q:
            auroc, shares = _review_cells(q)
            rows.append(("accuracy", "ours, real: review AUROC (Dice<0.8) / flagged / caught / "
                         f"exp. Dice MAE{_seeds(q)}", auroc,
                         shares + (f"; missed by every seed: {', '.join(q['missed'][:5])}"
                                   if q.get("missed") else "")))
    for case, c in cases.items():
        m = c.get("memory", {})
        rows.append((case, "peak RSS (process / largest child), MB", format_value(m.get("peak_rss_mb")),
                     format_value(m.get("children_peak_rss_mb"))))
    return rows


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as lines of left-aligned columns, a rule under the first (the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_table(doc: dict[str, Any]) -> str:
    """The printed table: machine line, figures, then the ratios against their targets."""
    m = doc["machine"]
    lines = [f"lesionseg bench{' (quick)' if doc.get('quick') else ''}: {m['cpu']}, "
             f"{m['cores']} cores, {m['threads']} threads, torch {m['torch']}, {m['device']}, "
             f"load {m.get('load_average_start')} -> {m.get('load_average_end')}", ""]
    lines += aligned([("case", "measurement", "median", "spread / notes"), *table_rows(doc)])
    lines += ["", "ratios:"]
    for name, t in doc["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = (", ".join(f"{k} {format_value(v)}" for k, v in value.items())
                 if isinstance(value, dict) else format_value(value))
        lines.append(f"  {name:28s} {shown:>24s}  target {t['target']:11s} {verdict}")
    return "\n".join(lines)


def _seeds(review: dict[str, Any]) -> str:
    """', mean of N seeds' for a review averaged over seeds (`trainers.review_mean`), else ''."""
    return f", mean of {review['seeds']} seeds" if review.get("seeds", 1) > 1 else ""


def _training(row: dict[str, Any]) -> str:
    """A trainer row's last cell: epochs, the images trained on, seconds, how ours inferred
    (one pass or the second pass's zoom cap, when recorded) and each seed's Dice."""
    seeds = row.get("per_seed")
    per_seed = (", seeds " + " / ".join(format_value(x["dice"]) for x in seeds)
                if seeds else "")
    return (f"{row['epochs']} epochs{_images(row)}, {format_value(row['train_seconds'])} s"
            f"{_passes(row)}{per_seed}")


def _passes(row: dict[str, Any]) -> str:
    """', second pass (zoom up to Z×)' or ', one pass' for a row that recorded how inference
    ran (ours: summary.json's `refine`, 0 = none); '' for a trainer that did not (the peers'
    scripts predict once)."""
    if "refine" not in row or row["refine"] is None:
        return ""
    return f", second pass (zoom up to {row['refine']:.2f}×)" if row["refine"] else ", one pass"


def _review_cells(review: dict[str, Any]) -> tuple[str, str]:
    """A review row's two cells: the AUROC, and the shares flagged and caught with the
    expected-Dice error."""
    return (format_value(review["auroc"]),
            f"{format_value(review['flagged_share'])} / {format_value(review['caught_share'])}"
            f" / {format_value(review['expected_dice_mae'])}")


def _images(row: dict[str, Any]) -> str:
    """' on N images' a trainer trained on, with the val images ours held out beside them (the
    plain script trains on every training pair, ours holds val out for its quality fit), so a
    comparison at equal epochs also shows the data each side had; '' when not recorded."""
    if row.get("train_images") is None:
        return ""
    held_out = f" + {row['val_images']} val held out" if row.get("val_images") else ""
    return f" on {row['train_images']} images{held_out}"
