"""The train job's run, read top to bottom: set up (data, schedule, recipe, model, optimizer,
resume), the loop (like the Accelerate examples: `prepare`, `accumulate`, `backward`,
`save_state`), then the outputs. The same code runs on one CPU, one GPU, or many GPUs on many
nodes.

The WebDataset loader is NOT given to `accelerator.prepare` (it would re-split or dispatch the
already rank-split stream, lesionseg.train.streams); batches are moved to the device in the
step. The scheduler and `Progress` are saved as JSON in every state (lesionseg.states), never
registered with Accelerate (which unpickles).

Cross-validation (data.folds=K, `train_folds`): fold I of the train + val cases is held out
for validation and the rest trained on, in <train.output_dir>/fold-I/ as an ordinary run
(resume, signals and all); data.fold=all trains the folds one after another. Each fold ends
by predicting its held-out cases (lesionseg.crossval.predict_held_out) and the command that
completes the set pools them.

Outputs in train.output_dir: config.yaml (at start), best.pt (the weights to use: the final
ones, or with train.select=best those of the best val train.best_metric), last.pt (end),
metrics.jsonl (one line per validation), states/, W&B files (lesionseg.tracking).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lesionseg import states, tracking
from lesionseg.checkpoint import save_weights
from lesionseg.config import Config, save_config
from lesionseg.crossval import evaluate_when_complete, predict_held_out
from lesionseg.data.folds import fold_dir, parse_fold
from lesionseg.errors import EXIT_FAILED, EXIT_OK, EXIT_RESUME, DataError, RankError
from lesionseg.losses import SegmentationLoss
from lesionseg.metrics import degenerate
from lesionseg.modelcard import write_run_card
from lesionseg.quality_fit import fit_quality
from lesionseg.recipe import resolve as resolve_recipe
from lesionseg.train import LOGGER
from lesionseg.train.batches import EpochBatches
from lesionseg.train.build import (
    build_model,
    build_optimizer,
    configure_torch,
    make_accelerator,
    set_encoder_frozen,
)
from lesionseg.train.cache import Memory, plan_memory
from lesionseg.train.data import DataPlan, check_stored_size, plan_data
from lesionseg.train.demo import build_demo_data
from lesionseg.train.evaluate import validate_and_keep_best
from lesionseg.train.loader import is_worker_failure
from lesionseg.train.resume import Progress, resume_run
from lesionseg.train.schedule import Schedule, build_scheduler, plan_schedule
from lesionseg.train.signals import StopFlag, agree, beat, waiting_for
from lesionseg.train.step import StepStats, count_bad_steps, log_train_scalars, train_step
from lesionseg.tuning import tune_checkpoint
from lesionseg.workers import worker_context

log = logging.getLogger(LOGGER)


def train(cfg: Config, demo: bool = False) -> int:
    """Train with the resolved config; returns 0, or EXIT_RESUME after a stop signal."""
    if cfg.data.num_workers:  # the fork server imports what workers need while we set up
        worker_context(cfg.data.worker_start)
    configure_torch(cfg)
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per save here
        logging.getLogger(name).setLevel(logging.WARNING)
    accelerator = make_accelerator(cfg)
    world, main = accelerator.num_processes, accelerator.is_main_process
    if not main:  # progress lines from the main process only; warnings from every rank
        log.setLevel(logging.WARNING)
    run_dir = Path(cfg.train.output_dir)

    # The data, the schedule, and the recipe resolved for that schedule.
    if demo:
        cfg.data.shards = build_demo_data(accelerator, cfg)
    data = plan_data(cfg.data.shards, cfg.data.folds, int(cfg.data.fold) if cfg.data.folds else 0,
                     cfg.data.fold_seed)
    if main:
        check_stored_size(data, cfg.data.image_size)
    schedule = plan_schedule(cfg, data.train_count, world)
    # The settings as given (auto keys still null) are what a resume must match: an extended
    # run's recipe is resolved anew for its longer schedule.
    given = copy.deepcopy(cfg)
    recipe = resolve_recipe(cfg, schedule.total_steps, schedule.steps_per_epoch)
    if main:
        log.info("recipe: %s", recipe.describe())
    memory = plan_memory(cfg, data)
    if main:
        log.info("memory: %s", memory.describe())
        _warn_shared_shards(cfg, data, memory, world)

    # Model, optimizer, schedule, loss; then resume where a state says.
    set_seed(cfg.train.seed)
    model = build_model(cfg)
    if main and cfg.model.init_from:
        log.info("model: every weight from %s (model.init_from: fine-tuning; "
                 "model.encoder_weights and model.head_prior are not used)", cfg.model.init_from)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, schedule)
    # The scheduler is stepped once per optimizer step here; Accelerate's prepared scheduler
    # would step it num_processes times per step.
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress()
    loss_fn = SegmentationLoss(cfg.loss.bce_weight, cfg.loss.dice_weight, cfg.loss.iou_weight,
                               smooth=cfg.loss.smooth, per_image=cfg.loss.per_image,
                               pos_weight=cfg.loss.pos_weight)
    resume_from, changed = resume_run(accelerator, cfg, given, run_dir, progress, scheduler,
                                      schedule)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not changed:  # else the weights beside it are the old settings' until the next save
            save_config(cfg, run_dir / "config.yaml")
    with waiting_for(accelerator, "the start of training"):
        accelerator.wait_for_everyone()
    tracking.start(accelerator, cfg, run_dir, progress.step)
    if main:
        _log_start(accelerator, cfg, data, schedule, demo)

    status = EXIT_FAILED  # the W&B run's exit record unless the run ends otherwise
    stop = StopFlag(cfg.train.stop_grace_s if accelerator.num_processes > 1 else 0.0,
                    f"rank {accelerator.process_index}")
    stop.install()
    try:
        with logging_redirect_tqdm():  # log lines print above the progress bar
            status, model = train_loop(accelerator, cfg, data, schedule, model, optimizer,
                                       scheduler, progress, loss_fn, run_dir, stop,
                                       resume_from, memory)
        stop.restore()
        if status == EXIT_OK:
            status = EXIT_FAILED
            if main:
                write_outputs(accelerator, cfg, data, model, progress, run_dir, demo)
            with waiting_for(accelerator, "rank 0 writing the outputs"):
                accelerator.wait_for_everyone()
            status = EXIT_OK
    finally:  # every ending (done, stop, error) flushes W&B and writes its exit record
        stop.restore()
        tracking.finish(accelerator, status)
    accelerator.end_training()  # (its trackers are finished) the process group
    return status


def train_loop(accelerator: Any, cfg: Config, data: DataPlan, schedule: Schedule, model: Any,
               optimizer: Any, scheduler: Any, progress: Progress, loss_fn: Any, run_dir: Path,
               stop: StopFlag, resume_from: Path | None, memory: Memory) -> tuple[int, Any]:
    """The epochs and their steps: fetch, agree, step, log, validate, save. Returns the status
    (0 or EXIT_RESUME) and the prepared model (prepared anew if the encoder was unfrozen)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    t, o = cfg.train, cfg.optim
    last_saved = progress.step if resume_from is not None else -1
    global_batch = cfg.data.batch_size * world * o.grad_accum_steps
    stats, skipped_total = StepStats(), 0
    unfreeze = cfg.model.freeze_encoder and cfg.model.unfreeze_after_epochs > 0
    model.train()
    with tqdm(total=schedule.total_steps, initial=progress.step, desc="train", unit="step",
              disable=not accelerator.is_main_process, dynamic_ncols=True) as bar:
        while progress.step < schedule.total_steps:  # an epoch (or what is left of it)
            started = time.perf_counter()  # the first step's time includes starting the epoch
            if unfreeze and progress.epoch >= cfg.model.unfreeze_after_epochs:
                model, optimizer = set_encoder_frozen(accelerator, model, optimizer, False)
                log.info("epoch %d: encoder unfrozen", progress.epoch)
                unfreeze = False
            length = schedule.micro_batches(progress.step, progress.micro)
            with EpochBatches(cfg, data, memory, accelerator, progress.epoch, length,
                              progress.micro) as epoch:
                epoch_done = False
                while not epoch_done:  # a step
                    batches, error = epoch.take(o.grad_accum_steps)
                    # One all-reduce per step: every rank learns whether any rank was asked to
                    # stop or failed to read its batches, before anyone enters the step's
                    # collectives. A stop wins: the state it saves needs no data.
                    with waiting_for(accelerator, f"the other ranks' batches of step "
                                     f"{progress.step + 1}"):
                        stopping, failed = agree(accelerator, stop.is_set, error is not None)
                    if stopping:
                        with waiting_for(accelerator, "saving a state after a stop signal"):
                            _save_and_stop(accelerator, run_dir, progress, scheduler,
                                           t.keep_states, saved=progress.step == last_saved)
                        return EXIT_RESUME, model
                    if failed:
                        _raise_data_failure(accelerator, error)
                    stats.skipped_samples += _log_skipped(batches, rank)

                    with waiting_for(accelerator, f"the gradients of step {progress.step + 1}"):
                        result = train_step(accelerator, model, optimizer, loss_fn, batches,
                                            cfg)
                    scheduler.step()
                    progress.step += 1
                    progress.micro += o.grad_accum_steps
                    count_bad_steps(progress, result.applied, t.max_bad_steps)
                    epoch_done = progress.micro >= epoch.length
                    if epoch_done:
                        progress.epoch += 1
                        progress.micro = 0
                        epoch.close()  # its workers stop before validation starts others
                    stats.add(result, global_batch, time.perf_counter() - started)
                    bar.update(1)
                    beat()
                    last = progress.step == schedule.total_steps
                    if progress.step % t.log_every_steps == 0 or last:
                        log_train_scalars(accelerator, stats, optimizer, progress, bar)
                        skipped_total += stats.skipped_samples
                        stats = StepStats()

                    if last:
                        progress.extra["finished_at"] = progress.step  # in the final state
                    validate = last or (t.val_every_steps > 0
                                        and progress.step % t.val_every_steps == 0) \
                        or (t.val_every_steps == 0 and epoch_done)
                    if validate:
                        with waiting_for(accelerator, f"the validation at step {progress.step}"):
                            validate_and_keep_best(accelerator, model, data, cfg, progress,
                                                   run_dir, memory.val)
                    if validate or (t.save_every_steps
                                    and progress.step % t.save_every_steps == 0):
                        with waiting_for(accelerator, f"saving the state of step {progress.step}"):
                            states.save_state(accelerator, run_dir, progress, scheduler,
                                              t.keep_states)
                        last_saved = progress.step
                    started = time.perf_counter()
    skipped_total += stats.skipped_samples
    if skipped_total:
        log.warning("rank %d skipped %d bad training samples in this segment", rank,
                    skipped_total)
    return EXIT_OK, model


def write_outputs(accelerator: Any, cfg: Config, data: DataPlan, model: Any, progress: Progress,
                  run_dir: Path, demo: bool) -> None:
    """After the last step (main process): last.pt, best.pt (train.select=final), the tuned
    post-processing or the fold's held-out predictions, config.yaml and MODEL_CARD.md."""
    net = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    last_val = progress.extra.get("last_val", {})
    on = tracking.trained_on(accelerator)
    save_weights(run_dir / "last.pt", net.state_dict(), cfg, step=progress.step,
                 epoch=progress.epoch, val=last_val, trained_on=on)
    if cfg.train.select == "final":
        save_weights(run_dir / "best.pt", net.state_dict(), cfg, step=progress.step,
                     epoch=progress.epoch, val=last_val, select="final", trained_on=on)
    if cfg.data.folds and (run_dir / "best.pt").is_file():  # its held-out cases: out of fold
        predict_held_out(run_dir, cfg, data.val_urls, data.val_ids, accelerator.device)
    tuned = None
    if not cfg.data.folds and cfg.train.tune_postprocess and (run_dir / "best.pt").is_file():
        tuned = tune_checkpoint(run_dir / "best.pt", data.val_urls, cfg.data.image_size,
                                accelerator.device, cfg.train.tune_min_images)
    if cfg.train.fit_quality and (run_dir / "best.pt").is_file():  # after the threshold
        fit_quality(run_dir / "best.pt", data.val_urls, cfg.data.image_size, accelerator.device,
                    ids=data.val_ids)
    save_config(cfg, run_dir / "config.yaml")  # describes the weights beside it
    write_run_card(run_dir)  # MODEL_CARD.md beside best.pt (lesionseg.modelcard)
    log.info("done: %d steps; best val %s %.4f at step %d, final %.4f; best.pt holds the "
             "%s weights (train.select); weights in %s and %s", progress.step,
             cfg.train.best_metric, progress.best, progress.best_step,
             last_val.get(cfg.train.best_metric, float("nan")),
             "final" if cfg.train.select == "final" else f"step {progress.best_step}",
             run_dir / "best.pt", run_dir / "last.pt")
    # Degenerate at 0.5, unless tuning found a threshold at which it is not.
    warning = None if tuned else degenerate(last_val.get("pred_fraction"))
    tracking.set_summary(accelerator, cfg, {"warning": warning or ""})
    if warning:  # the last words of the run: a model that learnt nothing is no result
        log.warning("DEGENERATE MODEL: %s (final val Dice %.4f). MODEL_CARD.md says so too.",
                    warning, last_val.get("dice", float("nan")))
    if demo:
        log.info("This was a DEMO on synthetic data (%s), not ISIC. To train on ISIC 2016: "
                 "python jobs/pack.py --source ISIC2016/ --out shards/isic2016, then "
                 "accelerate launch jobs/train.py data.shards=shards/isic2016 "
                 "model.encoder_weights=imagenet (its run folder: runs/isic2016)", data.folder)


def train_folds(cfg: Config, demo: bool = False) -> int:
    """data.folds=K: train the fold(s) data.fold names (all: one after another, each resumed
    where it stands) into <train.output_dir>/fold-I/; the last fold to finish evaluates the
    cross-validation (lesionseg.crossval). Returns the first non-zero status (EXIT_RESUME
    after a stop signal: rerun the same command)."""
    root = Path(cfg.train.output_dir)
    name = cfg.tracking.run_name or root.resolve().name
    folds = parse_fold(cfg.data.fold, cfg.data.folds)
    for fold in folds:
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.fold = str(fold)
        fold_cfg.train.output_dir = str(fold_dir(root, fold))
        fold_cfg.tracking.group = tracking.cross_validation_group(root, cfg)  # one W&B group
        fold_cfg.tracking.run_name = f"{name}-fold-{fold}"
        log.info("cross-validation %s: fold %d of %d (%s)", root, fold, cfg.data.folds,
                 "every fold, one after another" if len(folds) > 1 else "this fold only")
        status = train(fold_cfg, demo=demo)
        if status != EXIT_OK:
            return status
    if PartialState().is_main_process:  # the command that completes the folds pools them all
        evaluate_when_complete(root, cfg)
    return EXIT_OK


def _warn_shared_shards(cfg: Config, data: DataPlan, memory: Memory, world: int) -> None:
    """Warn when there are fewer train shards than reader lanes (lanes then share shards)."""
    lanes = world * max(1, cfg.data.num_workers)
    if memory.train is None and len(data.train_urls) < lanes:
        log.warning("%d train shard(s) for %d reader lanes (processes × data.num_workers): "
                    "lanes share shards; pack more shards (pack.shard_max_samples) for "
                    "better mixed epochs", len(data.train_urls), lanes)


def _log_start(accelerator: Any, cfg: Config, data: DataPlan, schedule: Schedule,
               demo: bool) -> None:
    """The start-up line: world, device, precision, batch, steps and images."""
    o, world = cfg.optim, accelerator.num_processes
    global_batch = cfg.data.batch_size * world * o.grad_accum_steps
    log.info("training: world size %d (%s), device %s, mixed precision %s, batch %d per "
             "process × %d accumulation steps = effective batch %d; %d steps (%d epochs "
             "of %d), %d train / %d val images%s", world, accelerator.distributed_type.value,
             accelerator.device, cfg.train.mixed_precision, cfg.data.batch_size,
             o.grad_accum_steps, global_batch, schedule.total_steps, schedule.epochs,
             schedule.steps_per_epoch, data.train_count, data.val_count,
             (f" (fold {cfg.data.fold} of {cfg.data.folds} held out of the train + val "
              "cases)" if cfg.data.folds else "")
             + (f", demo data in {data.folder}" if demo else ""))


def _save_and_stop(accelerator: Any, run_dir: Path, progress: Progress, scheduler: Any,
                   keep: int, saved: bool) -> None:
    """A stop signal at a step boundary: save a state (unless this step's is saved already)
    and say how the run goes on."""
    if not saved:
        states.save_state(accelerator, run_dir, progress, scheduler, keep)
    log.info("stop requested (signal): state saved at step %d; exiting with %d: rerun the "
             "same command to resume", progress.step, EXIT_RESUME)


def _raise_data_failure(accelerator: Any, error: str | None) -> None:
    """Some rank failed to read its training batches: every rank raises the first failing
    rank's one line (rank 0 prints it)."""
    rank = accelerator.process_index
    own = None if error is None else (f"rank {rank}: {error}" if accelerator.num_processes > 1
                                      else error)
    with waiting_for(accelerator, "the other ranks' errors"):
        errors = [e for e in gather_object([own]) if e] if accelerator.num_processes > 1 \
            else [own]
    message = f"reading training data failed: {errors[0]}"
    if is_worker_failure(errors[0]):
        raise RankError(message, shared=True)
    failure = DataError(message)
    failure.shared = True
    raise failure


def _log_skipped(batches: list[dict[str, Any]], rank: int) -> int:
    """Warn of the bad samples a step's batches left out (data.on_error=skip); their number."""
    count = 0
    for b in batches:
        count += len(b["skipped"])
        for msg in b["skipped"]:
            log.warning("rank %d: skipped a bad training sample: %s", rank, msg)
    return count
