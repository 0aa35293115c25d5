"""Benchmarks: `python jobs/bench.py [data|train|infer|accuracy|all] [--quick] [--out FILE]`.

Every figure is measured on the real code paths, side by side in one run: the training input
pipeline (`lesionseg.train.streams.TrainStream` over packed shards) against a plain folder
loader doing the same augmentation (case_data.py); the model step (fp32, bf16, channels_last,
frozen encoder) against `segmentation_models_pytorch`'s U-Net, and the real training loop
(`Loader`, `fetch_batches`, `train_step`) against the pure step on pre-made tensors
(case_train.py); the batch-inference job (`inference.run_inference`) against a naive
per-image loop and the bare model forward (case_infer.py); test Dice on hard synthetic data
against plain PyTorch scripts (case_accuracy.py, the trainers in trainers.py) and, with
--real DIR, on real ISIC 2016 images with the worst tenth and the failures counted
(case_real.py).

Method (measure.py, harness.py): warm-up, then the median of repeats; variants that compete
for the same CPU are interleaved (A B C, A B C, …) so that a noisy machine slows them alike.
Each case runs in a fresh process (spawned), so its peak RSS is its own: the case process's
VmHWM, and the largest peak of its child processes (DataLoader and pack workers, from
getrusage(RUSAGE_CHILDREN)). Data is generated under --workdir with the synthetic ISIC
generator (full-size JPEGs, mixed sizes up to 4288x2848) and reused by later runs that name
the same --workdir (datasets.py). The ratios, their targets and the printed table: table.py;
the plan and its presets: plan.py; the command: lesionseg/commands/bench.py.
"""
