"""Compatibility: the names `lesionseg.training` held before the train job became the
`lesionseg.train` package (the loop: lesionseg/train/loop.py; the command line:
lesionseg/commands/train.py). New code imports from their modules."""

from lesionseg.commands.launch import maybe_relaunch_cpu_ranks, requested_cpu_processes
from lesionseg.commands.train import EPILOG, add_arguments, command
from lesionseg.data.shard_format import read_shard
from lesionseg.errors import DataError
from lesionseg.train.batches import EpochBatches, fetch_batches
from lesionseg.train.build import (
    build_model,
    build_optimizer,
    configure_torch,
    make_accelerator,
    set_encoder_frozen,
)
from lesionseg.train.cache import Memory, plan_memory
from lesionseg.train.data import DataPlan, check_stored_size, plan_data, plan_fold
from lesionseg.train.demo import DEMO_DEFAULTS, apply_demo_defaults, build_demo_data
from lesionseg.train.evaluate import (
    evaluate,
    evaluate_checkpoint,
    summarize_results,
    validate_and_keep_best,
    validation_counts,
)
from lesionseg.train.loader import Loader, worker_error
from lesionseg.train.loop import train, train_folds, train_loop
from lesionseg.train.resume import (
    METRICS_FILE,
    Progress,
    changed_settings,
    check_resume,
    resume_settings,
    set_aside_previous_run,
)
from lesionseg.train.schedule import Schedule, lr_factor, plan_schedule
from lesionseg.train.signals import StopFlag, agree
from lesionseg.train.step import StepResult, StepStats, TrainingError, count_bad_steps, train_step
from lesionseg.train.streams import TrainStream, ValStream, lane_samples, lane_shards, shuffled

__all__ = [
    "DEMO_DEFAULTS", "EPILOG", "METRICS_FILE", "DataError", "DataPlan", "EpochBatches", "Loader",
    "Memory", "Progress", "Schedule", "StepResult", "StepStats", "StopFlag", "TrainStream",
    "TrainingError", "ValStream", "add_arguments", "agree", "apply_demo_defaults",
    "build_demo_data", "build_model", "build_optimizer", "changed_settings", "check_resume",
    "check_stored_size", "command", "configure_torch", "count_bad_steps", "evaluate",
    "evaluate_checkpoint", "fetch_batches", "lane_samples", "lane_shards", "lr_factor",
    "make_accelerator", "maybe_relaunch_cpu_ranks", "plan_data", "plan_fold", "plan_memory",
    "plan_schedule", "read_shard", "requested_cpu_processes", "resume_settings",
    "set_aside_previous_run", "set_encoder_frozen", "shuffled", "summarize_results", "train",
    "train_folds", "train_loop", "train_step", "validate_and_keep_best", "validation_counts",
    "worker_error",
]
