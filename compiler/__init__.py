"""ffc: a compiler for large-language-model inference."""
__version__ = "0.1.0"

from .errors import (ArtifactError, FfcError, InvalidRequestError, ModelNotFoundError, PassError,
                     UnsupportedModelError, UnsupportedOpError)


# The two entry points import their layer when called, so that `import ffc` stays light and
# `import ffc.runtime` (whose parent this is) never pulls in the compiler.

def compile(model: str, output: str, **options):
    """Compile ``model`` (alias, .gguf, HF folder or cached HF id) into an artifact at ``output``."""
    from .api import compile_model
    return compile_model(model, output, **options)


def load(path: str, memory_budget=None, overlap: bool = True, workload=None, **kwargs):
    """Load a compiled artifact; returns an ``LLM`` with generate / stream / chat. A kernel
    library built on another machine is rebuilt here from the artifact's sources.
    ``memory_budget`` (bytes, "200MiB", or a fraction of available memory): RAM for the weights,
    their streaming buffers and the KV cache; the weights that do not fit are streamed from disk
    by the policy search (compiler/offload_policy.py) for ``workload`` (a Workload or
    "prompt=512,output=32", FlexGen's and the default), ``overlap=False`` without reading ahead."""
    from .artifact import Artifact
    from .build import library_for
    from ffc.runtime.llm import LLM
    kwargs.setdefault("kernel_library", library_for)
    if memory_budget is None:
        try:
            memory_budget = Artifact.open(path, check_hashes=False).memory_budget   # compiled with --memory-budget
        except (ArtifactError, OSError):
            pass                                   # LLM.load says what is wrong with it
    if memory_budget is not None:                  # the policy search: imported only here (scipy, the profile)
        from .offload_policy import load_policy
        kwargs["offload"] = load_policy(path, memory_budget, overlap, kwargs, workload)
    return LLM.load(path, **kwargs)


__all__ = ["compile", "load", "FfcError", "ArtifactError", "InvalidRequestError", "ModelNotFoundError",
           "PassError", "UnsupportedModelError", "UnsupportedOpError", "__version__"]
