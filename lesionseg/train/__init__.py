"""The train job, one concern a module; `loop.py` holds the narrative of one run.

    data.py      the shard folder's train/val shards (DataPlan), a fold's ids
    streams.py   seeded lanes of raw samples → augmented uint8 micro-batches (TrainStream),
                 every val sample once (ValStream)
    loader.py    the DataLoader whose workers ignore stop signals and stop on `close()`
    cache.py     what data.cache keeps decoded in memory
    batches.py   an epoch's micro-batches: one object owning its stream and loader
    schedule.py  steps per epoch, total steps, the learning-rate curve
    build.py     Accelerator, model, optimizer, torch switches, encoder (un)freezing
    step.py      one optimizer step → StepResult; the logged means
    resume.py    Progress, the settings an exact resume needs, moving an old run aside
    signals.py   the stop flag (SIGTERM/SIGUSR1) and the agreement between ranks
    evaluate.py  validation on every val sample once, best.pt, metrics.jsonl
    demo.py      the synthetic demo set used when data.shards is null
    loop.py      train(): set up, resume, the loop, the outputs; train_folds()

The command line (argparse, epilog, CPU relaunch) is in lesionseg/commands/train.py.
"""

# Every module of the job logs as "lesionseg.training": the name its log lines have always
# carried (log readers and the Slurm tests match "lesionseg.training: step N: loss=").
LOGGER = "lesionseg.training"
