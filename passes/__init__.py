"""ffc passes: one pass per file, a manager, and the pipeline."""
from .manager import PassContext, PassRecord, run_pipeline
from .pipeline import PIPELINE, pass_names

__all__ = ["PassContext", "PassRecord", "run_pipeline", "PIPELINE", "pass_names"]
