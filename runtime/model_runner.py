"""One forward step of the model over the paged KV cache, on the compiled plan or the interpreter.

A step is a list of chunks, each a run of consecutive tokens of one sequence (a prompt
piece, or the one new token of a decoding sequence) with that sequence's block table. The
chunks are packed into one token list; the step returns, per chunk, the logits of its last
token. All-single-token steps use the ``decode`` graph; the rest use ``prefill``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ffc.errors import InvalidRequestError
from ffc.ir import Op, run_graph

from .device_memory import copy_kv_slots


MICROBATCH_MIN_ROWS = 16   # sequences per pipeline micro-batch at least


@dataclass(frozen=True)
class Chunk:
    tokens: Sequence[int]      # token ids, at positions start .. start + len - 1
    start: int
    blocks: Sequence[int]      # the sequence's KV blocks, covering at least start + len positions


class ModelRunner:
    def __init__(self, module, weights, compiled=None, ranks=None):
        self.compiled = compiled          # CompiledPlan, or None for the reference interpreter
        self.ranks = ranks                # RankGroup running a tensor-parallel artifact, or None
        self.events: Optional[list] = None   # a list: every step also adds its timeline (Chrome trace events)
        self.weights = weights
        stages = sorted(g for g in module.graphs if g.startswith("prefill_stage"))
        if stages:   # pipeline stages (run by the ranks): the first takes the inputs, the last gives logits
            last = len(stages) - 1
            self.graphs = {"prefill": module.graphs["prefill_stage0"], "decode": module.graphs["decode_stage0"]}
            if "verify_stage0" in module.graphs:
                self.graphs["verify"] = module.graphs["verify_stage0"]
            out_graph = module.graphs[f"decode_stage{last}"]
            # the driver's pool only keeps books; size blocks by the stage with the most layers
            self.cache_type = max((module.graphs[f"prefill_stage{k}"].input("kv_cache").type for k in range(last + 1)),
                                  key=lambda t: t.shape[0])
        else:
            self.graphs = {g: module.graphs[g] for g in ("prefill", "decode", "verify") if g in module.graphs}
            out_graph = self.graphs["decode"]
            self.cache_type = self.graphs["prefill"].input("kv_cache").type
        self.blocks_per_seq = int(self.graphs["prefill"].input("block_tables").type.shape[1])
        self.block_size = int(self.cache_type.shape[4])
        self.vocab_size = int(out_graph.outputs[0].type.shape[-1])
        # positions behind the last `kv_window` no layer reads (every layer has a sliding window)
        windows = [n.attrs.get("window") for name, g in module.graphs.items() if name.startswith("decode")
                   for n in g.nodes if n.op is Op.CACHED_ATTENTION]
        self.kv_window: Optional[int] = max(windows) if windows and None not in windows else None

    def limits(self, graph: str) -> tuple[int, int]:
        """Most tokens and most sequences (rows) one call of ``graph`` takes."""
        limits = getattr(self.compiled if self.compiled is not None else self.ranks, "limits", None)
        return limits[graph] if limits else (1 << 62, 1 << 62)   # none: the interpreter takes any size

    def _call(self, graph: str, inputs: dict) -> torch.Tensor:
        if self.events is not None:       # tracing (ffc.runtime.trace): the step's timeline too
            if self.ranks is None:
                return self.compiled.run(graph, inputs, events=self.events)[0][0]
            out, events = self.ranks.trace(graph, inputs)
            self.events += events
            return out
        if self.ranks is not None:
            return self.ranks.run(graph, inputs)
        if self.compiled is not None:
            return self.compiled.run(graph, inputs)[0][0]
        return run_graph(self.graphs[graph], self.weights, inputs)[0][0]

    def _tables(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        mb = self.blocks_per_seq
        flat = [0] * (len(chunks) * mb)
        for r, c in enumerate(chunks):
            if len(c.blocks) * self.block_size < c.start + len(c.tokens) or len(c.blocks) > mb:
                raise InvalidRequestError(f"chunk at {c.start} of {len(c.tokens)} tokens has {len(c.blocks)} KV "
                                          f"blocks of {self.block_size} positions (at most {mb})")
            flat[r * mb:r * mb + len(c.blocks)] = c.blocks
        return torch.tensor(flat, dtype=torch.long).view(len(chunks), mb)

    def forward(self, chunks: Sequence[Chunk], cache: torch.Tensor) -> torch.Tensor:
        """Run the chunks (writing their K/V into ``cache``); logits of each chunk's last token [n, V]."""
        if not chunks:
            raise InvalidRequestError("a step needs at least one chunk")
        if all(len(c.tokens) == 1 for c in chunks):
            _, rows = self.limits("decode")
            out = [self._decode(chunks[k:k + rows], cache) for k in range(0, len(chunks), rows)]
        else:
            out = [self._prefill(part, cache) for part in self._packed(chunks)]
        return torch.cat(out, 0) if len(out) > 1 else out[0]

    def all_logits(self, tokens: Sequence[int], blocks: Sequence[int], cache) -> torch.Tensor:
        """Logits at every position of one sequence written from position 0 into ``blocks``
        [len(tokens), V] (perplexity, KL divergence): prefill calls of at most the plan's logit
        rows, each asking for all of its positions."""
        max_t, rows = self.limits("prefill")
        step = min(max_t, rows)
        out = []
        for s in range(0, len(tokens), step):
            part = list(tokens[s:s + step])
            inputs = self.prefill_inputs([Chunk(part, s, blocks)], cache)
            inputs["block_tables"] = inputs["block_tables"].expand(len(part), -1).contiguous()   # N = the rows
            inputs["logits_index"] = torch.arange(len(part))
            out.append(self._call("prefill", inputs))
        return torch.cat(out, 0)

    # ------------------------------------------------------------ token trees (speculative decoding)
    @property
    def can_verify(self) -> bool:
        return "verify" in self.graphs

    def verify(self, items: Sequence[tuple], cache) -> list[torch.Tensor]:
        """Token trees, each (tree, base, blocks): the sequence's committed length and KV blocks
        (covering base + its nodes), in verify calls within the plan's tokens and rows; per tree
        the logits at its nodes [nodes, V]."""
        if not self.can_verify:
            raise InvalidRequestError("this artifact has no verify graph (a model with sliding-window attention, or "
                                      "compiled by an older ffc); speculative decoding needs one: recompile it")
        max_t, rows = self.limits("verify")
        calls, used = [[]], 0
        for it in items:
            n = len(it[0].tokens)
            if calls[-1] and (used + n > max_t or len(calls[-1]) == rows):
                calls.append([])
                used = 0
            calls[-1].append(it)
            used += n
        out = []
        for call in calls:
            logits = self._call("verify", self.verify_inputs(call, cache))
            k = 0
            for tree, _, _ in call:
                out.append(logits[k:k + len(tree.tokens)])
                k += len(tree.tokens)
        return out

    def verify_inputs(self, items: Sequence[tuple], cache) -> dict:
        ids, pos, seqs, bases, masks = [], [], [], [], []
        for r, (tree, base, _) in enumerate(items):
            ids += tree.tokens
            pos += [base + d for d in tree.depths()]
            seqs += [r] * len(tree.tokens)
            bases += [base] * len(tree.tokens)
            masks += tree.masks()
        tables = self._tables([Chunk(tree.tokens, base, blocks) for tree, base, blocks in items])
        return {"input_ids": torch.tensor(ids)[None], "position_ids": torch.tensor(pos)[None],
                "seq_ids": torch.tensor(seqs), "block_tables": tables, "kv_cache": cache,
                "tree_base": torch.tensor(bases), "tree_mask": torch.tensor(masks, dtype=torch.long)}

    def copy_slots(self, blocks: Sequence[int], moves: Sequence[tuple[int, int]], cache) -> None:
        """Copy the K/V of every layer from slot a to slot b of one sequence, for (a, b) in
        ``moves`` in order (the accepted nodes of a tree, to their positions)."""
        if not moves:
            return
        if self.ranks is not None:
            self.ranks.copy_slots(list(blocks), list(moves))
            return
        copy_kv_slots(cache, blocks, moves)

    def decode_inputs(self, chunks: Sequence[Chunk], cache) -> dict:
        """The decode graph's inputs for single-token chunks (one row each)."""
        return {"input_ids": torch.tensor([c.tokens[0] for c in chunks])[None],
                "position_ids": torch.tensor([c.start for c in chunks])[None],
                "seq_ids": torch.arange(len(chunks)), "block_tables": self._tables(chunks), "kv_cache": cache}

    def _decode(self, chunks: Sequence[Chunk], cache: torch.Tensor) -> torch.Tensor:
        stages = getattr(self.ranks, "stages", 1)
        if stages > 1 and len(chunks) >= 2 * MICROBATCH_MIN_ROWS and self.events is None:
            # pipeline stages: the batch as micro-batches in flight together, so stage s works
            # on one while stage s+1 works on the one before (small batches stay whole: each
            # micro-batch pays the step's fixed cost again)
            m = min(stages, len(chunks) // MICROBATCH_MIN_ROWS)
            parts = [chunks[k * len(chunks) // m:(k + 1) * len(chunks) // m] for k in range(m)]
            return torch.cat(self.ranks.run_many("decode", [self.decode_inputs(p, None) for p in parts]), 0)
        return self._call("decode", self.decode_inputs(chunks, cache))

    def _packed(self, chunks: Sequence[Chunk]) -> list[list[Optional[Chunk]]]:
        """Chunks packed into calls within the plan's tokens and rows; a chunk too long for one
        call is split (its earlier pieces' logits are dropped: None marks them)."""
        max_t, max_rows = self.limits("prefill")
        calls: list[list] = [[]]
        used = 0
        for c in chunks:
            done = 0
            while done < len(c.tokens):
                if used == max_t or len(calls[-1]) == max_rows:
                    calls.append([])
                    used = 0
                take = min(max_t - used, len(c.tokens) - done)
                part = Chunk(c.tokens[done:done + take], c.start + done, c.blocks)
                done += take
                calls[-1].append((part, done == len(c.tokens)))
                used += take
        return calls

    def prefill_inputs(self, chunks: Sequence[Chunk], cache) -> dict:
        """The prefill graph's inputs for chunks packed into one token list (a row and a logit each)."""
        ids, pos, seqs, last = [], [], [], []
        for r, c in enumerate(chunks):
            ids += c.tokens
            pos += range(c.start, c.start + len(c.tokens))
            seqs += [r] * len(c.tokens)
            last.append(len(ids) - 1)
        return {"input_ids": torch.tensor(ids)[None], "position_ids": torch.tensor(pos)[None],
                "seq_ids": torch.tensor(seqs), "block_tables": self._tables(chunks), "kv_cache": cache,
                "logits_index": torch.tensor(last)}

    def _prefill(self, call: list, cache: torch.Tensor) -> torch.Tensor:
        logits = self._call("prefill", self.prefill_inputs([c for c, _ in call], cache))
        keep = [r for r, (_, final) in enumerate(call) if final]
        return logits if len(keep) == len(call) else logits[keep]


def single_sequence_inputs(graph, ids: torch.Tensor, logits: str = "last") -> dict:
    """Inputs of a prefill graph for one sequence ``ids`` [1, t] at positions 0..t-1, with a
    fresh cache of just its blocks. ``logits``: "last" or "all" positions (logits_index)."""
    t = ids.shape[1]
    cache_t = graph.input("kv_cache").type
    mb = int(graph.input("block_tables").type.shape[1])
    nb = -(-t // int(cache_t.shape[4]))
    if nb > mb:
        raise InvalidRequestError(f"{t} tokens exceed the graph's {mb} blocks of {cache_t.shape[4]} positions")
    index = torch.arange(t) if logits == "all" else torch.tensor([t - 1])
    tables = torch.zeros(len(index), mb, dtype=torch.long)   # N rows (as logits_index); row 0 is used
    tables[0, :nb] = torch.arange(nb)
    inputs = {"input_ids": ids, "position_ids": torch.arange(t)[None], "seq_ids": torch.zeros(t, dtype=torch.long),
              "block_tables": tables, "kv_cache": torch.zeros(cache_t.concrete({"S": nb}), dtype=cache_t.torch_dtype)}
    if any(n.name == "logits_index" for n in graph.inputs):
        inputs["logits_index"] = index
    return inputs
