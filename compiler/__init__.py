"""ffc: a compiler for large-language-model inference."""
__version__ = "0.1.0"

from .errors import (ArtifactError, FfcError, InvalidRequestError, ModelNotFoundError, PassError,
                     UnsupportedModelError, UnsupportedOpError)


def compile(model: str, output: str, **options):
    """Compile ``model`` (alias, .gguf, HF folder or cached HF id) into an artifact at ``output``."""
    from .api import compile_model
    return compile_model(model, output, **options)


def load(path: str, **kwargs):
    """Load a compiled artifact; returns an ``LLM`` with generate / stream / chat."""
    from ffc.runtime.llm import LLM
    return LLM.load(path, **kwargs)


__all__ = ["compile", "load", "FfcError", "ArtifactError", "InvalidRequestError", "ModelNotFoundError",
           "PassError", "UnsupportedModelError", "UnsupportedOpError", "__version__"]
