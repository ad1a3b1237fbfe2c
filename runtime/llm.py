"""``ffc.load``: an artifact ready to generate text.

Sequences of one ``generate`` call each own a row (slot) of one preallocated KV cache.
Prompts are prefilled together as one packed token list; then every decode step runs
all unfinished sequences as one batch of one token each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from ffc import knobs
from ffc.artifact import read_manifest
from ffc.errors import ArtifactError, InvalidRequestError
from ffc.ir import parse, run_graph, verify_module
from ffc.ir.text import IRParseError
from ffc.ir.verify import VerifyError

from .sampling import SamplingParams, sample_next


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]          # "stop" (EOS or a stop string) or "length"
    prompt_token_ids: list[list[int]]


@dataclass
class _Seq:
    slot: int
    prompt: list[int]
    params: SamplingParams
    generator: Optional[torch.Generator]
    out: list[int] = field(default_factory=list)
    text: str = ""
    finish: Optional[str] = None


class LLM:
    def __init__(self, path: Path, manifest: dict, module, weights: dict, tokenizer, compiled=None):
        self.path = path
        self.compiled = compiled          # CompiledPlan, or None for the reference interpreter
        self.backend = "compiled" if compiled is not None else "interpreter"
        self.manifest = manifest
        self.module = module
        self.weights = weights
        self.tokenizer = tokenizer
        self.prefill_graph = module.graphs["prefill"]
        self.decode_graph = module.graphs["decode"]
        self.cache_type = self.prefill_graph.input("kv_cache").type
        self.max_seq_len = int(self.cache_type.shape[4])
        self.eos_ids = set(manifest.get("eos_token_ids", []))

    @classmethod
    def load(cls, path: Union[str, Path], check_hashes: bool = True, backend: Optional[str] = None) -> "LLM":
        """``backend``: "compiled" (generated kernels; the default when the artifact has them) or
        "interpreter" (the reference interpreter, for debugging)."""
        if backend not in (None, "compiled", "interpreter"):
            raise InvalidRequestError(f"backend {backend!r} is unknown; use 'compiled' or 'interpreter'")
        root = Path(path)
        manifest = read_manifest(root, check_hashes=check_hashes)
        final = manifest.get("final_ir", "")
        try:
            module = parse((root / final).read_text())
            verify_module(module)
        except (OSError, IRParseError, VerifyError) as e:
            raise ArtifactError(f"artifact IR {final} is unreadable: {e}; recompile the artifact") from None
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            weights = load_file(str(root / "weights" / "rank0.safetensors"))
        except (OSError, SafetensorError) as e:
            raise ArtifactError(f"artifact file weights/rank0.safetensors is unreadable ({e}); recompile") from None
        used = set().union(*(g.param_names() for g in module.graphs.values()))
        for name, p in module.params.items():
            if name not in used:
                continue
            t = weights.get(name)
            if t is None or tuple(t.shape) != p.type.concrete({}) or t.dtype != p.type.torch_dtype:
                raise ArtifactError(f"weight {name} in weights/rank0.safetensors does not match the IR "
                                    f"({p.type}); recompile the artifact")
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True,
                                                  trust_remote_code=False)
        threads = knobs.num_threads()
        if threads:
            torch.set_num_threads(threads)
        compiled = None
        if backend != "interpreter":
            if not manifest.get("kernels"):
                if backend == "compiled":
                    raise ArtifactError(f"{root} has no generated kernels (compiled with --no-codegen); "
                                        "recompile it, or load it with backend='interpreter'")
            else:
                from .compiled import open_compiled
                compiled = open_compiled(root, manifest, weights, threads)
        return cls(root, manifest, module, weights, tokenizer, compiled)

    # ------------------------------------------------------------ prompts
    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_prompt(self, messages: Union[str, Sequence[dict]]) -> str:
        """The tokenizer's chat template applied to ``messages`` (a string is one user turn)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; use a plain prompt")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def _prompt_ids(self, prompts: Sequence, chat: bool) -> list[list[int]]:
        out = []
        for k, p in enumerate(prompts):
            if isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) and not chat:
                ids = list(p)
            elif isinstance(p, str) or chat:
                if isinstance(p, str) and not p.strip() and not chat:
                    raise InvalidRequestError(f"prompt {k} is empty; give some text to continue")
                ids = self.encode(self.chat_prompt(p), add_special_tokens=False) if chat else self.encode(p)
            else:
                raise InvalidRequestError(f"prompt {k} is a {type(p).__name__}; give a string")
            if not ids:
                raise InvalidRequestError(f"prompt {k} is empty after tokenization; give some text")
            if len(ids) >= self.max_seq_len:
                raise InvalidRequestError(
                    f"prompt {k} has {len(ids)} tokens, but this artifact's max_seq_len is {self.max_seq_len}; "
                    "shorten the prompt or recompile with a larger --max-seq-len")
            out.append(ids)
        if not out:
            raise InvalidRequestError("no prompts given")
        return out

    # ------------------------------------------------------------ execution
    def kv_cache(self, slots: int) -> torch.Tensor:
        """A KV cache with at least ``slots`` sequences, reused across calls (grown when more are
        needed; a fresh one while another generation is still running). It needs no clearing: a
        token attends only to positions its own sequence has written."""
        kv = getattr(self, "_kv", None)
        if getattr(self, "_kv_busy", False):
            return torch.empty(self.cache_type.concrete({"S": slots}), dtype=self.cache_type.torch_dtype)
        if kv is None or kv.shape[2] < slots:
            self._kv = None  # free the old one first
            self._kv = torch.empty(self.cache_type.concrete({"S": slots}), dtype=self.cache_type.torch_dtype)
        return self._kv

    def _graph(self, name: str, inputs: dict) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled.run(name, inputs)[0][0]
        graph = self.prefill_graph if name == "prefill" else self.decode_graph
        return run_graph(graph, self.weights, inputs)[0][0]

    def _limits(self, name: str) -> tuple[int, int]:
        if self.compiled is None:
            return 1 << 62, 1 << 62
        return self.compiled.max_tokens(name), self.compiled.max_rows(name)

    def _prefill(self, seqs: list[_Seq], cache: torch.Tensor) -> torch.Tensor:
        """Prompts packed into steps of at most the plan's tokens and rows; a long prompt is split
        across steps (its later chunks attend to the earlier ones through the cache)."""
        max_t, max_rows = self._limits("prefill")
        chunks: list[list[tuple[_Seq, int, int]]] = [[]]
        used = 0
        for s in seqs:
            start = 0
            while start < len(s.prompt):
                if used == max_t or len(chunks[-1]) == max_rows:
                    chunks.append([])
                    used = 0
                take = min(max_t - used, len(s.prompt) - start)
                chunks[-1].append((s, start, take))
                used += take
                start += take
        rows = {}
        for chunk in chunks:
            ids, pos, slots, last = [], [], [], []
            for s, start, take in chunk:
                ids += s.prompt[start:start + take]
                pos += range(start, start + take)
                slots += [s.slot] * take
                last.append(len(ids) - 1)
            logits = self._graph("prefill", {
                "input_ids": torch.tensor(ids)[None], "position_ids": torch.tensor(pos)[None],
                "slot_ids": torch.tensor(slots), "kv_cache": cache, "logits_index": torch.tensor(last)})
            for k, (s, start, take) in enumerate(chunk):
                if start + take == len(s.prompt):
                    rows[s.slot] = logits[k]
        return torch.stack([rows[s.slot] for s in seqs])

    def _decode(self, seqs: list[_Seq], cache: torch.Tensor) -> torch.Tensor:
        _, max_rows = self._limits("decode")
        out = []
        for k in range(0, len(seqs), max_rows):
            part = seqs[k:k + max_rows]
            out.append(self._graph("decode", {
                "input_ids": torch.tensor([s.out[-1] for s in part])[None],
                "position_ids": torch.tensor([len(s.prompt) + len(s.out) - 1 for s in part])[None],
                "slot_ids": torch.tensor([s.slot for s in part]), "kv_cache": cache}))
        return torch.cat(out, 0) if len(out) > 1 else out[0]

    def _finish(self, s: _Seq, token: int) -> None:
        p = s.params
        s.out.append(token)
        s.text = self.tokenizer.decode(s.out, skip_special_tokens=True)
        for stop in p.stop:
            cut = s.text.find(stop)
            if cut >= 0:
                s.text, s.finish = s.text[:cut], "stop"
                return
        if token in self.eos_ids and not p.ignore_eos:
            s.finish = "stop"
        elif len(s.out) >= p.max_new_tokens or len(s.prompt) + len(s.out) >= self.max_seq_len:
            s.finish = "length"

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams) -> Iterator[list[_Seq]]:
        """Yield the sequences after every step until all are finished."""
        seqs = []
        for k, ids in enumerate(prompt_ids):
            gen = None
            if not params.greedy:
                gen = torch.Generator()
                gen.manual_seed(params.seed + k if params.seed is not None else torch.seed())
            seqs.append(_Seq(k, ids, params, gen))
        cache = self.kv_cache(len(seqs))
        owner = cache is getattr(self, "_kv", None)
        if owner:
            self._kv_busy = True
        try:
            logits = self._prefill(seqs, cache)
            active = seqs
            while active:
                for s, row in zip(active, logits):
                    seen = torch.tensor(s.prompt + s.out) if params.repetition_penalty != 1.0 else torch.empty(0)
                    self._finish(s, sample_next(row, seen.long(), params, s.generator))
                yield seqs
                active = [s for s in active if s.finish is None]
                if active:
                    logits = self._decode(active, cache)
        finally:
            if owner:
                self._kv_busy = False

    # ------------------------------------------------------------ public API
    def generate(self, prompts: Union[str, Sequence], max_new_tokens: int = 64, *, chat: bool = False,
                 **sampling) -> GenerationResult:
        """Generate for a batch of prompts (strings, token-id lists, or chat messages if ``chat``)."""
        if isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        prompt_ids = self._prompt_ids(list(prompts), chat)
        seqs: list[_Seq] = []
        for seqs in self._run(prompt_ids, params):
            pass
        return GenerationResult([s.text for s in seqs], [s.out for s in seqs], [s.finish for s in seqs],
                                prompt_ids)

    def stream(self, prompt, max_new_tokens: int = 64, *, chat: bool = False, **sampling) -> Iterator[str]:
        """Yield the text of one generation piece by piece as tokens are produced."""
        params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        prompt_ids = self._prompt_ids([prompt], chat)
        hold = max((len(s) for s in params.stop), default=1) - 1
        sent = 0
        for (s,) in self._run(prompt_ids, params):
            text = s.text
            if s.finish is None:  # keep back an unfinished character or a possible stop-string prefix
                end = len(text) - hold
                while end > sent and text[end - 1] == "\ufffd":
                    end -= 1
            else:
                end = len(text)
            if end > sent:
                yield text[sent:end]
                sent = end

    def chat(self, messages: Union[str, Sequence[dict]], max_new_tokens: int = 256, **sampling) -> str:
        return self.generate([messages], max_new_tokens, chat=True, **sampling).texts[0]


