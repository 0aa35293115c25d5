"""GPU checks in one short run: `python jobs/gpucheck.py [--out gpu-check.json] [--quick]
[--device cuda|cpu]`.

What a host that is lent a GPU should confirm, every figure measured on the real code paths:
the environment; the training step (the real model, loss and AdamW) in fp32, fp16 + GradScaler
and bf16, contiguous and channels_last, and under torch.compile; host-to-device copies from
pageable and pinned memory; the batch-inference job against a naive per-image loop and the
bare batched forward; the training job end to end in fp16 and bf16; DDP over NCCL when there
is more than one GPU.

Each part runs in its own spawned process and session (own CUDA context, own peak memory)
under a time limit, the smaller of its own and what is left of the run's budget: a part that
fails or runs out of time is killed with everything it started, recorded as such, and the
next part runs. The JSON is rewritten after every part, so a run cut short still leaves the
finished parts' figures. `--device cpu` runs the same code at tiny sizes (the tests do); the
CUDA-only parts are then recorded as skipped. docs/gpucheck.md says what each figure means.
"""

from lesionseg.gpucheck.command import add_arguments, command, main
from lesionseg.gpucheck.plan import PARTS, TARGETS, CheckPlan, GpuCheckError, plan_for
from lesionseg.gpucheck.run import not_applicable, run_checks, run_part
from lesionseg.gpucheck.table import format_table, summarize, table_rows
from lesionseg.gpucheck.train_job import _free_port, ddp_command, read_train_run, run_command

_summarize = summarize  # the name the tests knew

__all__ = ["PARTS", "TARGETS", "CheckPlan", "GpuCheckError", "_free_port", "_summarize",
           "add_arguments", "command", "ddp_command", "format_table", "main", "not_applicable", "plan_for",
           "read_train_run", "run_checks", "run_command", "run_part", "summarize", "table_rows"]
