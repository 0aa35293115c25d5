"""lesionseg: skin-lesion segmentation on ISIC 2016 as a job suite (pack, train, infer, bench)."""

__version__ = "0.2.0"
