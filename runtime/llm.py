"""``ffc.load``: an artifact ready to generate text.

Every generation goes through one engine (engine.py): requests share a paged KV cache and
are batched step by step (in-flight batching), whether they come from ``generate``,
``stream`` or the HTTP server.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ffc import knobs
from ffc.artifact import Artifact
from ffc.errors import ArtifactError, FfcError, InvalidRequestError
from ffc.ir.types import DType
from ffc.util import parse_memory

from . import distributed
from .compiled import open_compiled
from .device_memory import HOST
from .engine import Engine, releasable
from .kernel_library import trusted, vouch
from .kv_cache import BlockPool
from .model_runner import ModelRunner
from .offload import OffloadPolicy
from .sampling import MAX_SEED, SamplingParams
from .scheduler import Request, SchedulerConfig
from .speculative import LookupFirst, ModelDraft

LOOKUP_FIRST = "ngram+"      # "ngram+self", "ngram+PATH": prompt lookup, else the draft model (LLM.draft)
# the safetensors header's dtype names, as the IR spells them
_SAFETENSORS_DTYPES = {"F32": "f32", "BF16": "bf16", "F16": "f16", "I64": "i64", "U8": "u8"}
LibraryHook = Callable[[Artifact], Path]


def read_verified_module(art: Artifact):
    """The artifact's final IR, verified unless this very file was verified here before (its
    SHA-256 in the trust registry; seconds of shape checks in every fresh process, such as each
    CLI command); a file that passes is recorded."""
    ir = art.path(art.final_ir)
    if trusted(ir):
        return art.read_module(verify=False)
    module = art.read_module()
    vouch(ir)
    return module


def load_tokenizer(art: Artifact):
    """The artifact's tokenizer; a file that does not parse, or that the tokenizer libraries
    refuse, is an ArtifactError naming it (the files are untrusted input)."""
    from transformers import AutoTokenizer   # heavy: imported when an artifact is loaded
    for f in sorted(art.path("tokenizer").glob("*.json")):
        try:
            json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"artifact file tokenizer/{f.name} in {art.root} is not valid JSON ({e}); "
                                "recompile the artifact") from None
    try:
        return AutoTokenizer.from_pretrained(str(art.path("tokenizer")), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer libraries raise on a bad file
        raise ArtifactError(f"the artifact's tokenizer/ in {art.root} does not load ({type(e).__name__}: "
                            f"{str(e)[:200]}); recompile the artifact") from None


def cut_short(ids: Sequence[list[int]], params: Sequence[SamplingParams], max_seq_len: int) -> list[str]:
    """Where a prompt plus its max_new_tokens pass max_seq_len: generation stops there (finish
    "length"), said in the result instead of silently."""
    return [f"prompt {k}: {len(x)} tokens + max_new_tokens {p.max_new_tokens} exceed max_seq_len {max_seq_len}; "
            f"at most {max_seq_len - len(x)} tokens will be generated"
            for k, (x, p) in enumerate(zip(ids, params)) if len(x) + p.max_new_tokens > max_seq_len]


def shipped_library(art: Artifact) -> Path:
    """The kernel library the artifact ships (what ``load`` uses when given no hook), if ffc
    built that file on this machine (kernel_library.trusted); native code from elsewhere is
    never loaded."""
    lib, plan = art.path(art.kernels["library"]), art.path(art.kernels["plan"])
    if not plan.is_file() or not trusted(plan):
        raise ArtifactError(f"{art.kernels['plan']} was not written or checked by ffc on this machine, so it is "
                            "not run (its kernels trust its offsets); load the artifact with ffc.load, which checks "
                            "it against the final IR")
    if not lib.is_file() or not trusted(lib, plan):
        raise ArtifactError(f"{art.kernels['library']} was not built by ffc on this machine for this plan, so it is "
                            "not loaded (it is native code); load the artifact with ffc.load, which builds its "
                            "kernels from the plan, or run `ffc build ARTIFACT` to build and vouch for its sources")
    return lib


def _check_weights(art: Artifact, module, offload: Optional[OffloadPolicy], backend: Optional[str]) -> dict:
    """Every rank's weights file against the IR (shapes and dtypes, read from the headers); the
    tensors of rank 0 when this process runs the model itself (one rank), else none. With an
    ``offload`` policy (LLM.load: which weights stay in RAM, the rest streamed from disk;
    runtime/offload.py) none either: the plan reads them from the artifact's offload store."""
    tp, pp = art.tp, art.pp
    if offload is not None and (backend == "interpreter" or not art.kernels or tp * pp > 1):
        raise InvalidRequestError("a memory budget (offloaded weights) needs a one-rank artifact with generated "
                                  "kernels, loaded with the compiled backend")
    for rank in range(tp * pp):
        rel = f"weights/rank{rank}.safetensors"
        used = module.stage_params(rank // tp, pp)
        try:
            with safe_open(str(art.path(rel)), "pt") as f:
                have = {k: (tuple(f.get_slice(k).get_shape()), _SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype()))
                        for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise ArtifactError(f"artifact file {rel} is unreadable ({e}); recompile") from None
        for name, p in module.params.items():
            # a quantized weight is stored as uint8 rows of its format's blocks
            stored = DType.U8 if p.type.dtype.quantized else p.type.dtype
            if name in used and have.get(name) != (p.type.storage_shape(), stored.value):
                raise ArtifactError(f"weight {name} in {rel} does not match the IR ({p.type}); recompile the artifact")
    return load_file(str(art.path("weights/rank0.safetensors"))) if tp * pp == 1 and offload is None else {}


def _start_ranks(art: Artifact, backend: Optional[str], library: Optional[Path]):
    """The ranks of a multi-rank artifact and the tokenizer: under torchrun, this process's group
    (a rank > 0 serves rank 0's steps, then exits); else local worker processes, started first so
    that they start (a second or two) while this process reads the tokenizer."""
    world = art.tp * art.pp
    if distributed.torchrun_env() is not None:       # started by torchrun, on one or more machines
        rank, _ = distributed.join_torchrun_group(art, backend)
        if rank != 0:
            distributed.follow_torchrun(art, backend, library)
            raise SystemExit(0)
        return distributed.TorchrunRanks(art, world, backend, library), load_tokenizer(art)
    ranks = distributed.RankGroup(art, world, backend=backend, stages=art.pp, library=library, wait=False)
    try:
        tokenizer = load_tokenizer(art)
        ranks.ready()
    except BaseException:
        ranks.close(force=True)
        raise
    return ranks, tokenizer


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]          # "stop" (EOS or a stop string) or "length"
    prompt_token_ids: list[list[int]]
    warnings: list[str] = field(default_factory=list)   # e.g. a request cut short by max_seq_len


def kv_disk_layers(compiled) -> int:
    """The last layers whose KV cache is on disk (a memory budget's offload policy), 0: none."""
    offload = getattr(compiled, "offload", None)
    return offload.policy.kv_disk if offload is not None else 0


class LLM:
    def __init__(self, art: Artifact, module, weights: dict, tokenizer, compiled=None, ranks=None, *,
                 kv_cache_memory=None, max_tokens_per_batch: int = 256, max_requests_per_batch: Optional[int] = None,
                 prefix_caching: bool = True):
        self.path = art.root
        self.artifact = art
        self.compiled = compiled          # CompiledPlan, or None for the reference interpreter
        self.memory = compiled.memory if compiled is not None else HOST   # where the KV pool lives
        self.device = self.memory.device
        self.backend = "compiled" if compiled is not None else "interpreter"
        self.manifest = art.manifest
        self.module = module
        self.weights = weights
        self.tokenizer = tokenizer
        self.runner = ModelRunner(module, weights, compiled, ranks)
        self.ranks = ranks                # RankGroup of a tensor-parallel artifact
        self.cache_type = self.runner.cache_type
        holds = self.runner.blocks_per_seq * self.runner.block_size      # positions the IR's block tables hold
        if art.max_seq_len is not None and not 0 < art.max_seq_len <= holds:
            raise ArtifactError(f"the manifest's options.max_seq_len {art.max_seq_len} does not fit the IR "
                                f"{art.final_ir}, whose KV block tables hold {holds} positions; recompile the artifact")
        self.max_seq_len = art.max_seq_len or holds
        self.eos_ids = art.eos_token_ids
        rows = min(self.runner.limits("decode")[1], 256)
        self.config = SchedulerConfig(max_tokens_per_batch=max_tokens_per_batch,
                                      max_requests_per_batch=max_requests_per_batch or rows,
                                      max_seq_len=self.max_seq_len, kv_window=self.runner.kv_window)
        self._kv_budget = parse_memory(kv_cache_memory, self.memory.available)
        self._prefix_caching = prefix_caching
        self._engine: Optional[Engine] = None

    @property
    def engine(self) -> Engine:
        """The one engine every generation goes through (its KV pool is allocated on first use)."""
        if self._engine is None:
            pool = BlockPool.for_budget(self.cache_type, self.runner.blocks_per_seq, self._kv_budget,
                                        self.config.max_requests_per_batch * self.runner.blocks_per_seq,
                                        memory=None if self.ranks else self.memory, prefix_caching=self._prefix_caching,
                                        disk_layers=kv_disk_layers(self.compiled))
            if self.ranks is not None:
                self.ranks.allocate_pool(pool.num_blocks)
            self._engine = Engine(self.runner, self.tokenizer, self.eos_ids, pool, self.config)
            curve = (self.manifest.get("speculative") or {}).get("verify_cost")
            if curve:    # the cost model's step time by tokens: the tree shapes' prior
                self._engine.speculation.control.set_curve(curve)
        return self._engine

    def close(self) -> None:
        """Stop the worker ranks of a tensor-parallel artifact (also done at exit)."""
        if self.ranks is not None:
            self.ranks.close()

    @classmethod
    def load(cls, path: Union[str, Path], check_hashes: bool = True, backend: Optional[str] = None,
             kernel_library: Optional[LibraryHook] = None, offload: Optional[OffloadPolicy] = None,
             **engine) -> "LLM":
        """``backend``: "compiled" (generated kernels; the default when the artifact has them) or
        "interpreter" (the reference interpreter, for debugging). ``kernel_library(artifact)``:
        the path of a kernel library that loads here (``ffc.load`` gives the compiler's hook,
        which rebuilds one from the artifact's sources when the shipped one does not load;
        default: the shipped one). ``engine`` options:
        ``kv_cache_memory`` (bytes, "2GiB", or a fraction of available memory; default 0.2 of it),
        ``max_tokens_per_batch`` (prefill + decode tokens per step, default 256),
        ``max_requests_per_batch`` (sequences per step, default the plan's decode batch),
        ``prefix_caching`` (share KV blocks of identical prompt prefixes, default True)."""
        if backend not in (None, "compiled", "interpreter"):
            raise InvalidRequestError(f"backend {backend!r} is unknown; use 'compiled' or 'interpreter'")
        art = Artifact.open(path, check_hashes=check_hashes)
        module = read_verified_module(art)
        tp, pp = art.tp, art.pp
        weights = _check_weights(art, module, offload, backend)
        tokenizer = load_tokenizer(art) if tp * pp == 1 else None     # with ranks: read while they start
        threads = knobs.num_threads()
        if threads:
            torch.set_num_threads(threads)
        if backend == "compiled" and not art.kernels:
            raise ArtifactError(f"{art.root} has no generated kernels for its ranks; load it with "
                                "backend='interpreter' or recompile" if tp * pp > 1 else
                                f"{art.root} has no generated kernels (compiled with --no-codegen); "
                                "recompile it, or load it with backend='interpreter'")
        library = (kernel_library or shipped_library)(art) if backend != "interpreter" and art.kernels else None
        compiled = ranks = None
        if tp * pp > 1:
            ranks, tokenizer = _start_ranks(art, backend, library)
        elif library is not None:
            compiled = open_compiled(art, weights, library, threads, offload=offload)
            weights = compiled.weights   # what the kernels read; packed originals are freed
        llm = cls(art, module, weights, tokenizer, compiled, ranks, **engine)
        llm._load_options = {"check_hashes": check_hashes, "backend": backend, "kernel_library": kernel_library}
        if kv_disk_layers(compiled):     # its file made now: no room on disk is an error at load
            compiled.bind(llm.engine.pool.tensor)
        return llm

    # ------------------------------------------------------------ speculative decoding
    def draft(self, speculative: Optional[str]) -> Optional[str]:
        """The engine's name for a speculative draft, loading a draft model on first use:
        "ngram" (prompt lookup), "self" (the self-draft this artifact was compiled with, by
        ``--self-draft``), a draft artifact's path, or "ngram+" and either (``load_draft``)."""
        if speculative is None:
            return None
        if kv_disk_layers(self.compiled):
            raise InvalidRequestError("speculative decoding moves accepted tokens' K/V within the KV cache; with part "
                                      "of it on disk (this memory budget's policy) it cannot: load with more or none")
        spec = self.engine.speculation
        if speculative in spec.drafts:
            return speculative
        spec.drafts[speculative] = load_draft(self, speculative)
        return speculative

    # ------------------------------------------------------------ prompts
    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_prompt(self, messages: Union[str, Sequence[dict]]) -> str:
        """The tokenizer's chat template applied to ``messages`` (a string is one user turn)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidRequestError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} "
                                      f"dicts (or one string); got {type(messages).__name__} {messages!r:.60}")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{k}] must be a dict with string 'role' and 'content'; "
                                          f"got {m!r:.80}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; use a plain prompt")
        try:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - the template's own refusal (a role it does not know, an order)
            raise InvalidRequestError(f"messages: the chat template refused them: {type(e).__name__}: {e}") from None

    def prompt_ids(self, prompt, chat: bool = False, index: int = 0) -> list[int]:
        """Token ids of one prompt: a string, token ids, or (``chat``) messages for the chat template."""
        k = index
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt) \
                and not chat:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.runner.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt {k} has token id {bad[0]}, outside the vocabulary "
                                          f"0..{self.runner.vocab_size - 1}")
        elif isinstance(prompt, str) or chat:
            if isinstance(prompt, str) and not prompt.strip() and not chat:
                raise InvalidRequestError(f"prompt {k} is empty; give some text to continue")
            ids = self.encode(self.chat_prompt(prompt), add_special_tokens=False) if chat else self.encode(prompt)
        else:
            raise InvalidRequestError(f"prompt {k} is a {type(prompt).__name__}; give a string or token ids")
        if not ids:
            raise InvalidRequestError(f"prompt {k} is empty after tokenization; give some text")
        if len(ids) >= self.max_seq_len:
            raise InvalidRequestError(
                f"prompt {k} has {len(ids)} tokens, but this artifact's max_seq_len is {self.max_seq_len}; "
                "shorten the prompt or recompile with a larger --max-seq-len")
        return ids

    def _prompt_ids(self, prompts: Sequence, chat: bool) -> list[list[int]]:
        if not prompts:
            raise InvalidRequestError("no prompts given")
        return [self.prompt_ids(p, chat, k) for k, p in enumerate(prompts)]

    # ------------------------------------------------------------ execution
    def _params(self, n: int, max_new_tokens: int, sampling: dict,
                sampling_params: Optional[Sequence[SamplingParams]]) -> list[SamplingParams]:
        if sampling_params is None:
            out = [SamplingParams(max_new_tokens=max_new_tokens, **sampling)] * n
        elif sampling or len(sampling_params) != n or not all(isinstance(p, SamplingParams) for p in sampling_params):
            raise InvalidRequestError(f"sampling_params must be one SamplingParams per prompt ({n}), "
                                      "without other sampling keywords")
        else:
            out = list(sampling_params)
        for p in out:
            if p.max_new_tokens >= self.max_seq_len:
                raise InvalidRequestError(f"invalid max_new_tokens={p.max_new_tokens}: this artifact's max_seq_len is "
                                          f"{self.max_seq_len} (prompt and output together); ask for fewer tokens "
                                          "or recompile with a larger --max-seq-len")
        return out


    def submit(self, prompt, max_new_tokens: int = 64, *, chat: bool = False, seed: Optional[int] = None,
               listener=None, request_id: Optional[str] = None, speculative: Optional[str] = None,
               **sampling) -> Request:
        """Queue one request on the engine and return it (``engine.wait`` / ``engine.abort`` it)."""
        ids = self._prompt_ids([prompt], chat)[0]
        params = self._params(1, max_new_tokens, sampling, None)[0]
        return self.engine.submit(ids, params, seed=seed, listener=listener, request_id=request_id,
                                  draft=self.draft(speculative))

    def generate(self, prompts: Union[str, Sequence], max_new_tokens: int = 64, *, chat: bool = False,
                 sampling_params: Optional[Sequence[SamplingParams]] = None, speculative: Optional[str] = None,
                 **sampling) -> GenerationResult:
        """Generate for a batch of prompts (strings, token-id lists, or chat messages if ``chat``).
        One set of sampling keywords for all, or ``sampling_params`` with one per prompt; a seed
        ``s`` gives prompt k the seed ``s + k``. ``speculative``: a draft ("ngram": prompt lookup)
        proposes token trees that one verify step checks; the output is what plain decoding
        gives (greedy: the same tokens; sampling: the same distribution)."""
        if isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        prompt_ids = self._prompt_ids(list(prompts), chat)
        params = self._params(len(prompt_ids), max_new_tokens, sampling, sampling_params)
        engine = self.engine
        speculative = self.draft(speculative)
        reqs = []
        group = uuid.uuid4().hex if len(prompt_ids) > 1 else None
        try:
            for k, (ids, p) in enumerate(zip(prompt_ids, params)):
                seed = None if p.seed is None else (p.seed + k) % (MAX_SEED + 1)
                reqs.append(engine.submit(ids, p, seed=seed, draft=speculative, group=group))
            engine.wait(reqs)
        except BaseException:
            for r in reqs:
                engine.abort(r)
            raise
        for r in reqs:
            if r.finish == "error":
                raise FfcError(f"generation failed: {r.error}")
        return GenerationResult([r.text for r in reqs], [list(r.out) for r in reqs], [r.finish for r in reqs],
                                prompt_ids, cut_short(prompt_ids, params, self.max_seq_len))

    def stream(self, prompt, max_new_tokens: int = 64, *, chat: bool = False, speculative: Optional[str] = None,
               **sampling) -> Iterator[str]:
        """Yield the text of one generation piece by piece as tokens are produced. Closing the
        iterator early cancels the request."""
        params = self._params(1, max_new_tokens, sampling, None)[0]
        ids = self._prompt_ids([prompt], chat)[0]
        engine = self.engine
        req = engine.submit(ids, params, draft=self.draft(speculative))
        hold = max((len(s) for s in params.stop), default=1) - 1
        sent = 0
        try:
            while True:
                done = req.finished    # read before the text: a finished request's text is final
                text = req.text
                end = releasable(text, sent, hold, done)
                if end > sent:
                    yield text[sent:end]
                    sent = end
                if done:
                    break
                if engine.running_loop:
                    req.done.wait(0.05)
                else:
                    engine.step()
            if req.finish == "error":
                raise FfcError(f"generation failed: {req.error}")
        finally:
            if not req.finished:
                engine.abort(req)

    def chat(self, messages: Union[str, Sequence[dict]], max_new_tokens: int = 256, **sampling) -> str:
        return self.generate([messages], max_new_tokens, chat=True, **sampling).texts[0]


def load_draft(llm: "LLM", speculative: str) -> Union[ModelDraft, LookupFirst]:
    """The draft model ``speculative`` names for ``llm`` ("self" or an artifact's path), checked;
    or for "ngram+" and such a name, prompt lookup where its tree promises more, else the model."""
    if speculative.startswith(LOOKUP_FIRST):
        spec = llm.engine.speculation
        model = spec.drafts.get(llm.draft(speculative[len(LOOKUP_FIRST):]))
        if not isinstance(model, ModelDraft):
            raise InvalidRequestError(f"speculative draft {speculative!r}: after {LOOKUP_FIRST!r} comes a draft "
                                      "model, 'self' or a draft artifact's path")
        return LookupFirst(spec.drafts["ngram"], model)
    prior = {}
    if speculative == "self":
        info = (llm.manifest.get("speculative") or {}).get("self_draft")
        if not info:
            raise InvalidRequestError(f"{llm.path} has no self-draft; recompile it with --self-draft "
                                      "(or use --speculative ngram, or a draft artifact's path)")
        path = llm.artifact.path(info["path"], "speculative.self_draft.path")
        prior = {"acceptance": float(info["acceptance"]), "cost": float(info["draft_cost"])}
    else:
        path = Path(speculative)
        if not (path / "manifest.json").is_file():
            raise InvalidRequestError(f"speculative draft {speculative!r} is not 'ngram', 'self', the path of "
                                      "an ffc artifact or 'ngram+' and one of the last two")
    opts = getattr(llm, "_load_options", {})
    draft = LLM.load(path, check_hashes=opts.get("check_hashes", True), backend=opts.get("backend"),
                     kernel_library=opts.get("kernel_library"), kv_cache_memory=None)
    if draft.ranks is not None:
        draft.close()
        raise InvalidRequestError(f"draft artifact {path} has {draft.artifact.ranks} ranks; a draft runs in this "
                                  "process on one: compile it with --tp 1 --pp 1")
    if draft.tokenizer.get_vocab() != llm.tokenizer.get_vocab():
        raise InvalidRequestError(f"draft artifact {path} has a different tokenizer from {llm.path} (its "
                                  f"{len(draft.tokenizer.get_vocab())} tokens are not this model's "
                                  f"{len(llm.tokenizer.get_vocab())}); a draft must share the target's vocabulary")
    return ModelDraft(draft, speculative, llm.runner.vocab_size,
                      max_sequences=llm.config.max_requests_per_batch, **prior)
