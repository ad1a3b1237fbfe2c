"""ffc passes: one pass per file, a manager, and the pipeline."""
from .manager import Decision, PassContext, PassRecord, run_pipeline
from .pipeline import PIPELINE, SEARCH_POINT, pass_names, pipeline_until_search

__all__ = ["Decision", "PassContext", "PassRecord", "run_pipeline", "PIPELINE", "SEARCH_POINT", "pass_names",
           "pipeline_until_search"]
