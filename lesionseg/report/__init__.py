"""report.html, the page a researcher reads first after an inference run (`page`), with
its tables, galleries, charts and style in modules of their own."""

from lesionseg.report.figures import ISIC_FAILURE_JACCARD, error_type, quartiles
from lesionseg.report.page import write_report

__all__ = ["ISIC_FAILURE_JACCARD", "error_type", "quartiles", "write_report"]
