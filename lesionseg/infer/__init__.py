"""The infer job's parts below its run (lesionseg/inference.py: the run; lesionseg/commands/
infer.py: its command line):

    split.py    the work split (flags, Slurm array), process state, device, processes per host
    journal.py  the part files under <out>/parts/ (rows, signature, done markers), --out layout
    decode.py   reading and decoding one input (in a decode thread or worker process)
    loader.py   decode threads or DataLoader worker processes → batches, in order
    phases.py   the forward and the CPU stages taking turns on the cores
    finish.py   one image's outputs and scores (a finishing thread); failures become rows
    predict.py  the forward pass: a checkpoint, an exported file, or an ensemble of them
    outputs.py  what to write per image, the full-size mask, previews and overlays
    merge.py    part files → metrics.csv, errors.csv, summary.json, report.html
"""

from lesionseg.errors import UserError


class InferenceError(UserError):
    """An output folder or setting that prevents the run (names the file or option)."""
