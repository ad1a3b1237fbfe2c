"""The self-draft: a cheaper model the compiler derives from the target for speculative decoding.

Draft & Verify and SWIFT draft with the target's own layers minus some (the residual stream
carries over a skipped layer; the final norm and lm_head stay). Here the draft is also stored
in 4-bit blocks (the GGUF file's own when the model is one, else int4-g32), so each of its
steps reads a fraction of the target's bytes. Which layers to skip is decided by measurement
and the cost model:

  acceptance  on calibration sequences (the target's own greedy answers to a few prompts, or
              the user's text), how often the draft's argmax equals the target's, in eager
              PyTorch with the draft's weights; first for each layer skipped alone, then for
              the k least harmful skipped together, k = 0 .. L/2;
  cost        the cost model's predicted decode step of the kept layers plus the rest, in the
              draft's weight format, against the target's step; the verify step's cost by
              tree size from the target's predicted step over T tokens against one;
  choice      the k whose best tree shape (SpecControl) promises the most tokens per unit of time.

The draft is compiled as an artifact of its own inside the target's (``draft/``), and the
manifest records the skipped layers, the measured acceptance and the costs, which the runtime
takes as its priors (then replaces by what it measures).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from ffc.ir.quant import dequantize, quantize
from ffc.ir.types import DType
from ffc.runtime.speculative import SpecControl

from .errors import InvalidRequestError
from .frontend import decoder_layers

PROMPTS = ("What are three tips for staying healthy?",
           "Explain how a bicycle works to a ten-year-old.",
           "Write a short story about a robot who learns to paint.",
           "Summarise the causes of the French Revolution in a paragraph.")


@dataclass
class SelfDraftChoice:
    skip_layers: list[int]
    acceptance: float          # measured on the calibration sequences
    draft_cost: float          # a draft step / a target decode step, predicted
    node_cost: float           # the extra cost of a verified tree node (of 9), predicted
    widths: list[int]          # the tree shape the cost model picks at that acceptance
    speedup: float             # predicted tokens per unit of time over plain decoding
    quant: str                 # the draft's weight storage
    candidates: list[dict] = field(default_factory=list)

    def manifest(self, path: str) -> dict:
        return {"path": path, **asdict(self)}


def _layer_list(model) -> tuple[torch.nn.ModuleList, str]:
    paths = list(decoder_layers(model))
    if not paths:
        raise InvalidRequestError("--self-draft: the model's transformer layers were not found")
    parent = paths[0].rsplit(".", 1)[0]
    layers = model.get_submodule(parent)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != len(paths):
        raise InvalidRequestError("--self-draft: the model's transformer layers are not one ModuleList")
    return layers, parent


def calibration_sequences(hf, tokenizer, text: Optional[str], new_tokens: int = 48) -> list[tuple[torch.Tensor, int]]:
    """(token ids [1, T], first position scored): the user's text, or the target's own greedy
    answers to a few prompts (chat-templated when the tokenizer has a template)."""
    if text is not None:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :512]
        if ids.shape[1] < 16:
            raise InvalidRequestError("--calibration text has fewer than 16 tokens; give a longer text")
        return [(ids, 1)]
    out = []
    for p in PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True)
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            full = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append((full, ids.shape[1]))
    return out


def _predictions(model, seqs, keep: list[int], layers: torch.nn.ModuleList, parent: str) -> list[torch.Tensor]:
    """The model's argmax at the scored positions with only the ``keep`` layers."""
    owner = model.get_submodule(parent.rsplit(".", 1)[0]) if "." in parent else model
    name = parent.rsplit(".", 1)[-1]
    setattr(owner, name, torch.nn.ModuleList([layers[i] for i in keep]))
    try:
        with torch.no_grad():
            return [model(input_ids=ids, use_cache=False).logits[0, start - 1:-1].argmax(-1) for ids, start in seqs]
    finally:
        setattr(owner, name, layers)


def quantized_copy(hf, fmt: Optional[DType]):
    """``hf`` with its layers' linear weights as ``fmt`` stores them (None: unchanged, e.g. a
    GGUF model whose float weights are already its blocks' values)."""
    if fmt is None:
        return hf
    q = copy.deepcopy(hf)
    layers, _ = _layer_list(q)
    with torch.no_grad():
        for mod in layers.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                mod.weight.copy_(dequantize(quantize(w.float(), fmt), fmt, w.shape[1]).view_as(w))
    return q


def choose(hf, q_hf, seqs, costs: Callable[[list[int]], float], curve: dict, quant: str,
           log: Callable[[str], None] = lambda s: None) -> SelfDraftChoice:
    """The skipped layers (see the module doc). ``costs(skip)``: the draft's predicted step
    relative to the target's; ``curve``: the target's predicted step over T tokens against one."""
    layers, parent = _layer_list(hf)
    q_layers, _ = _layer_list(q_hf)
    n = len(layers)
    ref = _predictions(hf, seqs, list(range(n)), layers, parent)
    total = sum(len(r) for r in ref)

    def agreement(skip) -> float:
        keep = [i for i in range(n) if i not in skip]
        got = _predictions(q_hf, seqs, keep, q_layers, parent)
        return sum(int((a == b).sum()) for a, b in zip(got, ref)) / total

    alone = {i: agreement({i}) for i in range(n)} if n > 1 else {}
    order = sorted(alone, key=lambda i: -alone[i])       # least harmful first
    control = SpecControl()
    control.set_curve(curve)
    node_cost = (control.predicted(9) - 1) / 8
    cands = []
    for k in range(0, n // 2 + 1):
        skip = sorted(order[:k])
        a = agreement(set(skip))
        c = costs(skip)
        widths, rate = control.plan(a, c)
        cands.append({"skip": k, "skip_layers": skip, "acceptance": round(a, 4), "draft_cost": round(c, 4),
                      "widths": widths, "speedup": round(rate, 4)})
        log(f"self-draft: skip {k:2d} layers: acceptance {a:.3f}, cost {c:.3f} of a target step, "
            f"predicted speed-up {rate:.2f}x")
        if a < 0.3:
            break
    best = max(cands, key=lambda x: x["speedup"])
    return SelfDraftChoice(best["skip_layers"], best["acceptance"], best["draft_cost"], round(node_cost, 4),
                           best["widths"], best["speedup"], quant, cands)


def draft_model(hf, skip: list[int]):
    """A copy of ``hf`` without the ``skip`` layers (renumbered, its config saying so), and the
    renaming of its parameters: old HF name prefix -> new."""
    layers, parent = _layer_list(hf)
    keep = [i for i in range(len(layers)) if i not in set(skip)]
    d = copy.deepcopy(hf)
    d_layers, _ = _layer_list(d)
    owner = d.get_submodule(parent.rsplit(".", 1)[0]) if "." in parent else d
    setattr(owner, parent.rsplit(".", 1)[-1], torch.nn.ModuleList([d_layers[i] for i in keep]))
    cfg = d.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, len(keep))
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == len(layers):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    for new, mod in enumerate(_layer_list(d)[0]):
        for sub in mod.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new
    rename = {f"{parent}.{old}.": f"{parent}.{new}." for new, old in enumerate(keep)}
    return d, rename


def rename_blocks(blocks: dict, rename: dict) -> dict:
    """The GGUF blocks of the kept layers under the draft's names (a skipped layer's dropped)."""
    prefix = next(iter(rename)).rsplit(".", 2)[0] + "."        # the layer list's path
    out = {}
    for name, v in blocks.items():
        if not name.startswith(prefix):
            out[name] = v
            continue
        head = prefix + name[len(prefix):].split(".", 1)[0] + "."
        if head in rename:
            out[rename[head] + name[len(head):]] = v
    return out
