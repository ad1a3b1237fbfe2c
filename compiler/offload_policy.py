"""Where an artifact's weights and KV cache live under a memory budget: FlexGen's policy search
on a CPU.

Two tiers on a machine without a GPU: RAM and disk. A *unit* (runtime/offload.py: a layer's
weights, or one weight outside the layers) is resident or streamed; the KV cache of the batch
and the slot buffers streamed units are read into take RAM too, and the KV cache of the last
layers may live on disk (runtime/kv_stream.py: read into two layer-sized slots and written
back every step). An option is priced for a block of BLOCK batches of prompts run by the
engine's in-flight batching (``schedule``): with at most b sequences running and s tokens a
step, the prompts' prefill rides in H *heavy* steps (prompt chunks beside the running decodes:
compute-bound) and the rest are L *light* steps (decodes only: bound by reading the streamed
weights), every step reading them once. For each batch b, step size s and slot configuration
(two slots of the largest streamed unit's size, read ahead; or one, when memory is that tight,
nothing overlapped) the LP (scipy's HiGHS) chooses the resident fraction x of the weights and
the fraction k of the KV cache on disk minimising the predicted time:

    minimise  H Th + L Tl
    s.t.      Th >= Ch(s),  Tl >= Cl(b)                                compute, all in RAM
              Th >= ((1 - x) W + k Rh) / D,  Tl >= ((1 - x) W + k Rl) / D     the disk I/O (overlapped: max)
              x W + slots + (1 - k) KV(b) + kv slots <= budget,  0 <= x, k <= 1

(without overlap the I/O adds to the compute instead). Rh, Rl: the KV bytes a heavy and a light
step read and write were all of it on disk (``kv_traffic``); kv slots: two layers' share of KV(b),
paid only when k > 0 (the LP is solved with k = 0 and with k free, the better kept). KV on
disk pays where it lets a batch large enough to amortise the weights' reads fit: FlexGen's
trade, which a long context (a sequence's KV as large as the weights it would amortise) loses.
Units too large for the slot size, too small to be worth a read, or read again after other
units (a tied embedding) stay resident. The option with the highest predicted tokens/s wins;
k is rounded up to whole layers and x down to whole units (the largest that fit first), and the
option priced again per unit: a streamed unit costs the longer of its compute and its read
(their sum without overlap), a resident one its compute, a disk layer's KV I/O adds to its
unit's. Compute is the roofline of the calibrated profile (weight bytes at the memory
bandwidth, or FLOPs at the peak, whichever is longer); D is this disk's read bandwidth with the
page cache bypassed (``disk_bandwidth``: measured once per file system, by ``ffc calibrate`` or
on first use).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

from scipy.optimize import linprog

from ffc import knobs
from ffc.artifact import Artifact
from ffc.errors import InvalidRequestError
from ffc.ir.graph import ParamRef
from ffc.ir.ops import LAYOUT, WEIGHT_INPUTS, Op
from ffc.ir.strategy import Workload
from ffc.ir.types import DType
from ffc.plan.schema import limits
from ffc.util import parse_memory
from ffc.runtime.llm import read_verified_module
from ffc.runtime.kv_stream import SLOTS, ram_layers
from ffc.runtime.offload import ALIGN, OffloadPolicy, format_policy, open_store, pinned_units

from .calibrate import profile_for
from .disk import disk_bandwidth
from .lower.split import chunk_rows, largest_layer, param_bytes
from .lower.targets import PANEL_ROWS, QPANEL_ROWS


SMALL = 64 << 10      # units below this stay in RAM (a norm's weight: not worth a slot and a read)
FLEXGEN = Workload(prompt_tokens=512, output_tokens=32)   # the workload a policy is priced for by default
BLOCK = 4             # batches of prompts an option is priced over (FlexGen's block; the throughput mode's many)


@dataclass(frozen=True)
class Costs:
    """The numbers a policy is priced with."""
    memory_bandwidth: float     # bytes/s
    flops: float                # FLOP/s
    disk_bandwidth: float       # bytes/s, page cache bypassed
    kernel_overhead: float = 0.0
    steps: int = 0              # kernels per step (their overhead)
    prefill_tokens: int = 0     # most tokens per step (the engine's max_tokens_per_batch; 0: a prompt a step)
    fixed_step: bool = False    # the step size is the user's: price that one only (else fewer are tried too)


@dataclass(frozen=True)
class Option:
    name: str
    resident: frozenset
    batch: int
    overlap: bool
    weights_ram: int            # bytes of resident units
    ring: int                   # bytes of the slots
    kv: int
    step_tokens: int            # tokens per engine step (prompt chunks beside the batch's decodes)
    heavy: int                  # steps carrying prompt chunks, and their seconds each
    heavy_s: float
    light: int                  # steps of decodes only, and their seconds each
    light_s: float
    sequences: int              # prompts priced (a block of batches)
    tokens_per_s: float
    slots: int = 2
    kv_disk: int = 0            # layers whose KV cache is on disk (the last ones), read and written each step

    def describe(self, budget: int) -> str:
        mib = 1 << 20
        disk = f" ({self.kv_disk} layers' on disk)" if self.kv_disk else ""
        return (f"{self.name:<28} batch {self.batch:>3} x {self.step_tokens:>3} tokens/step  weights in RAM "
                f"{self.weights_ram / mib:7.1f} MiB + slots {self.ring / mib:6.1f} + KV {self.kv / mib:6.1f}{disk} of "
                f"{budget / mib:.1f} MiB  {self.heavy} steps of {self.heavy_s * 1e3:.1f} ms + {self.light} of "
                f"{self.light_s * 1e3:.1f} ms per {self.sequences} prompts  {self.tokens_per_s:8.1f} tok/s")


def _phase(units, resident, compute_per_byte: float, disk_bw: float, overlap: bool, extra: dict) -> float:
    """Seconds of one step: per unit its compute (a share of the step's by its bytes), its disk
    I/O (a streamed unit's read, and ``extra[name]`` bytes: its layer's KV cache read and
    written where that is on disk) overlapped with (or after) the compute."""
    t = 0.0
    for name, nbytes in units:
        c = nbytes * compute_per_byte
        io = ((0 if name in resident else nbytes) + extra.get(name, 0)) / disk_bw
        t += (max(c, io) if overlap else c + io) if io else c
    return t


def _compute(w_bytes: int, flops_per_token: float, tokens: int, costs: Costs) -> float:
    return max(w_bytes / costs.memory_bandwidth, tokens * flops_per_token / costs.flops) + costs.steps * \
        costs.kernel_overhead


def price(units, resident, batch: int, step_tokens: int, flops_per_token: float, costs: Costs,
          overlap: bool, kv_io: tuple = (0, 0), kv_disk: int = 0, kv_layers: int = 0) -> tuple[float, float]:
    """Predicted seconds of a heavy step (``step_tokens`` tokens: prompt chunks beside the batch's
    decodes) and of a light one (the batch's decodes), each reading every streamed unit and, for
    the last ``kv_disk`` of ``kv_layers`` layers, its share of ``kv_io`` (a heavy and a light
    step's KV bytes read and written, every layer's)."""
    w = sum(b for _, b in units) or 1
    heavy = _compute(w, flops_per_token, step_tokens, costs)
    light = _compute(w, flops_per_token, batch, costs)
    disk = [f"layer {i}" for i in range(kv_layers - kv_disk, kv_layers)]
    return tuple(_phase(units, resident, c / w, costs.disk_bandwidth, overlap, {n: io / kv_layers for n in disk})
                 for c, io in ((heavy, kv_io[0]), (light, kv_io[1])))


def schedule(batch: int, prompt: int, output: int, step_tokens: int, sequences: int) -> tuple[int, int]:
    """(heavy, light) steps the engine's in-flight batching takes for ``sequences`` prompts, at
    most ``batch`` running, ``step_tokens`` tokens a step. The running sequences' decodes go
    first; the rest of a step's tokens go to the next prompt, so a prompt's prefill shares its
    steps with the others' decodes (a heavy step: compute-bound, which hides the reads a step
    of decodes alone waits for). A sequence holds its place for its prompt's p steps and its
    output's; the places start p steps apart (one prompt's prefill at a time), and the last
    sequences decode alone after the prompts are done."""
    per = max(step_tokens - batch, 1)
    heavy = -(-sequences * prompt // per)
    p = prompt / per
    total = max(heavy + output, math.ceil((min(batch, sequences) - 1) * p + -(-sequences // batch) * (output + p)))
    return heavy, total - heavy


def step_choices(costs: Costs, batch: int) -> list[int]:
    """Tokens per engine step to try at ``batch``: the most the engine takes, and fewer (a heavy
    step whose compute matches the reads of the streamed weights wastes neither), at least twice
    the batch (a step is mostly prompt)."""
    most = costs.prefill_tokens or 512
    if costs.fixed_step:
        return [most]
    return [t for t in sorted({128, 192, 256, 384, most}) if 2 * batch <= t <= most] or [most]


def _lp(w: int, cap: int, ch: float, cl: float, heavy: int, light: int, disk_bw: float, overlap: bool,
        kv: int = 0, kv_io: tuple = (0, 0)) -> Optional[tuple[float, float, float]]:
    """(x, k, predicted seconds) the LP chooses (None: infeasible): x the resident fraction of the
    streamable weights (``w`` bytes), k the fraction of the KV cache (``kv`` bytes; 0: it stays
    in RAM) on disk. Minimise heavy Th + light Tl, each step at least its compute (``ch``,
    ``cl``) and its disk I/O, (1 - x) w of weights read plus k of ``kv_io`` (a heavy and a light
    step's KV bytes read and written), or their sum without overlap; x w + (1 - k) kv <= cap + kv."""
    if cap + kv < 0:
        return None
    io, rh, rl = w / disk_bw, kv_io[0] / disk_bw, kv_io[1] / disk_bw
    # variables [x, k, Th, Tl]
    c = [0.0, 0.0, float(heavy), float(light)]
    if overlap:
        a = [[0, 0, -1, 0], [0, 0, 0, -1], [-io, rh, -1, 0], [-io, rl, 0, -1]]
        b = [-ch, -cl, -io, -io]
    else:
        a = [[-io, rh, -1, 0], [-io, rl, 0, -1]]
        b = [-(ch + io), -(cl + io)]
    a.append([w, -kv, 0, 0])
    b.append(cap)
    res = linprog(c, A_ub=a, b_ub=b, bounds=[(0, 1), (0, 1 if kv else 0), (0, None), (0, None)], method="highs")
    return (float(res.x[0]), float(res.x[1]), float(res.fun)) if res.status == 0 else None


def kv_traffic(per_position: int, block: int, prompt: int, output: int):
    """Bytes of KV cache (every layer's) a heavy and a light step read and write, as a function
    of the batch and the step's tokens: each running sequence's positions read (on average over
    its time in the batch, its prompt and half its output), its newest block written, and a heavy
    step's prompt chunk written."""
    def io(b: int, step: int) -> tuple[int, int]:
        read = b * (prompt + output / 2) * per_position
        light = read + b * block * per_position
        return int(light + step * per_position), int(light)
    return io


def _round(units, frac: float, w: int) -> frozenset:
    """Whole units whose bytes sum to at most frac * w, the largest first."""
    allow = frac * w + 1
    keep = set()
    for name, nbytes in sorted(units, key=lambda u: -u[1]):
        if nbytes <= allow:
            keep.add(name)
            allow -= nbytes
    return frozenset(keep)


def _ring(units, resident, slots: int) -> int:
    """Bytes of the slots streamed units alternate between (each as large as its largest)."""
    streamed = [b for n, b in units if n not in resident]
    return sum(max(streamed[k::slots], default=0) for k in range(slots))


def search(units: list[tuple[str, int]], budget: int, *, kv_bytes, max_batch: int, prompt: int, output: int,
           flops_per_token: float, costs: Costs, overlap: bool = True, pinned: frozenset = frozenset(),
           kv_layers: int = 0, kv_io=None) -> tuple[Option, list[Option]]:
    """The best option under ``budget`` bytes (weights, slots, KV) and the alternatives shown
    beside it: all in RAM (when it fits) and the same batch without overlap. ``kv_bytes(b)``: the
    KV pool a batch of b sequences needs; ``pinned``: units that must stay resident. Each option
    is priced for a block of BLOCK batches of prompts (``schedule``). With ``kv_layers`` and
    ``kv_io(b, step)`` (kv_traffic) the KV cache of the last layers may go to disk: read and written
    every step through two layer-sized slots in RAM, so that a larger batch fits."""
    w = sum(b for _, b in units)
    names = frozenset(n for n, _ in units)
    # the slots hold the largest streamed units: try streaming only units up to each size
    sizes = sorted({b for _, b in units})
    options = []
    least = kv_bytes(1) + min(limit + sum(s for n, s in units if s > limit or s < SMALL or n in pinned)
                              for limit in sizes)
    shape = (prompt, output, flops_per_token, costs, kv_io, kv_layers)
    b = 1
    while b <= max_batch:
        kv = kv_bytes(b)
        # two slots: a unit is read while the one before it computes; one slot (when memory is that
        # tight): each read waits for the unit before it to finish, nothing overlaps
        for limit, slots in [(size, k) for size in sizes for k in (2, 1)]:
            # too large to stream at this slot size, or too small to be worth a read
            forced = frozenset(n for n, s in units if s > limit or s < SMALL or n in pinned)
            fixed_bytes = sum(s for n, s in units if n in forced)
            room = budget - slots * limit - fixed_bytes       # for the streamable weights and the KV cache
            rest = [(n, s) for n, s in units if n not in forced]
            wr = sum(s for _, s in rest)
            ahead = overlap and slots == 2
            for step in step_choices(costs, b):
                heavy, light = schedule(b, prompt, output, step, BLOCK * b)
                share = wr / max(w, 1)
                ch = _compute(w, flops_per_token, step, costs) * share
                cl = _compute(w, flops_per_token, b, costs) * share
                found = _lp(wr, room - kv, ch, cl, heavy, light, costs.disk_bandwidth, ahead)
                if kv_layers and kv_io is not None:      # the KV of some layers on disk, two layer slots in RAM
                    on_disk = _lp(wr, room - kv - SLOTS * kv // kv_layers, ch, cl, heavy, light, costs.disk_bandwidth,
                                  ahead, kv, kv_io(b, step))
                    if on_disk is not None and on_disk[1] > 0 and (found is None or on_disk[2] < found[2]):
                        found = on_disk
                if found is None:
                    continue
                disk = min(math.ceil(found[1] * kv_layers - 1e-6), kv_layers) if found[1] > 0 else 0
                ram_kv = kv * ram_layers(kv_layers, disk) // kv_layers if disk else kv
                frac = min(max(min(found[0], (room - ram_kv) / wr), 0.0), 1.0) if wr else 1.0
                if room - ram_kv >= 0:
                    options.append(_option("policy", units, forced | _round(rest, frac, wr), b, ahead, ram_kv, step,
                                           slots, shape, disk))
        if kv + w <= budget:
            options.append(_option("all in RAM", units, names, b, overlap, kv, step_choices(costs, b)[-1], 2, shape))
        b *= 2
    fits = [o for o in options if o.weights_ram + o.ring + o.kv <= budget]
    if not fits:
        raise InvalidRequestError(f"a memory budget of {budget / (1 << 20):.1f} MiB is less than the least this "
                                  f"artifact runs in ({least / (1 << 20):.1f} MiB: the weights too large to stream, "
                                  "a streaming slot and the KV cache of one sequence of max_seq_len); give a "
                                  "larger --memory-budget, or compile with a smaller --max-seq-len")
    best = max(fits, key=lambda o: o.tokens_per_s)
    alts = [max((o for o in fits if o.name == "all in RAM"), key=lambda o: o.tokens_per_s, default=None)]
    if best.overlap and (best.resident != names or best.kv_disk):
        alts.append(_option("streamed, no overlap", units, best.resident, best.batch, False, best.kv,
                            best.step_tokens, best.slots, shape, best.kv_disk))
    kept = [o for o in fits if not o.kv_disk]          # what the budget gives with the whole KV cache in RAM
    if best.kv_disk and kept:
        alts.append(replace(max(kept, key=lambda o: o.tokens_per_s), name="KV cache in RAM"))
    return best, [a for a in alts if a is not None and a != best]


def _option(name, units, resident, batch, overlap, kv, step, slots, shape, kv_disk: int = 0) -> Option:
    prompt, output, flops_per_token, costs, kv_io, kv_layers = shape
    io = kv_io(batch, step) if kv_disk else (0, 0)
    heavy_s, light_s = price(units, resident, batch, step, flops_per_token, costs, overlap, io, kv_disk, kv_layers)
    heavy, light = schedule(batch, prompt, output, step, BLOCK * batch)
    if resident == frozenset(n for n, _ in units) and name == "policy" and not kv_disk:
        name = "all in RAM"
    elif name == "policy" and slots == 1:
        name = "policy (one slot)"
    elif name == "policy" and kv_disk:
        name = "policy (KV on disk)"
    return Option(name, resident, batch, overlap, sum(b for n, b in units if n in resident),
                  _ring(units, resident, slots), kv, step, heavy, heavy_s, light, light_s, BLOCK * batch,
                  BLOCK * batch * output / (heavy * heavy_s + light * light_s), slots, kv_disk)


def to_policy(o: Option, budget: int, alternatives: list[Option]) -> OffloadPolicy:
    return OffloadPolicy(o.resident, o.overlap, o.batch, o.slots, {
        "budget": budget, "chosen": o.describe(budget), "alternatives": [a.describe(budget) for a in alternatives],
        "predicted_tokens_per_s": o.tokens_per_s, "step_tokens": o.step_tokens, "heavy_s": o.heavy_s,
        "light_s": o.light_s, "weights_ram": o.weights_ram, "slots": o.ring, "kv": o.kv}, kv_disk=o.kv_disk)


def kv_bytes_per_position(cache_type) -> int:
    """Bytes of every layer's K and V for one position of a cache type (axis 2: the blocks, axis 4:
    the positions of a block)."""
    shape = list(cache_type.shape)
    return math.prod(int(d) for d in shape[:2] + shape[3:4] + shape[5:]) * cache_type.dtype.itemsize


def _kv_pool(per_position: int, block: int, seq: int, max_seq_len: int):
    """The KV pool a batch of b sequences of ``seq`` positions needs (whole blocks; one sequence
    of max_seq_len at least), as a function of b."""
    longest = -(-max_seq_len // block)

    def kv_bytes(b: int) -> int:
        return max(b * -(-seq // block), longest) * block * per_position
    return kv_bytes


def streaming_prefill_tokens(limit: int) -> int:
    """The most tokens per step of an engine streaming weights (each step reads them again),
    within the plan's ``limit``; the policy may choose fewer (``step_choices``)."""
    return max(256, min(512, limit))


def _costs(profile, disk_bw: float, steps: int, prefill_tokens: int, fixed_step: bool = False) -> Costs:
    return Costs(memory_bandwidth=profile.memory_bandwidth, flops=profile.flops("fp32"), disk_bandwidth=disk_bw,
                 kernel_overhead=profile.kernel_overhead, steps=steps, prefill_tokens=prefill_tokens,
                 fixed_step=fixed_step)


class OffloadPlan(NamedTuple):
    policy: OffloadPolicy
    best: Option                # the option the policy came from
    alternatives: list          # the options priced beside it
    units: list                 # the artifact's units (runtime.offload.Unit), placed in its store
    costs: Costs                # what they were priced with


def plan_offload(art: Artifact, budget: int, *, prompt: int = 512, output: int = 32, overlap: bool = True,
                 disk_bw: Optional[float] = None, prefill_tokens: int = 512, fixed_step: bool = False,
                 log=lambda s: None) -> OffloadPlan:
    """The policy for a one-rank CPU artifact under ``budget`` bytes (weights, slots and the KV
    cache of the batch; the runtime's own memory is not in it), and what it was chosen from;
    ``prefill_tokens``: the most tokens per engine step (exactly that many if ``fixed_step``)."""
    plan = art.plan
    module = read_verified_module(art)
    path, units = open_store(art, plan, module)
    prof = profile_for("local", log)
    cache_type = module.graphs["prefill"].input("kv_cache").type
    params = 0
    for u in units:
        for t in u.tensors:     # a packed one: its rows (an lm_head chunk is a range of the param's)
            p = plan.packed.get(t)
            info = plan.params[p.param if p else t]
            params += (sum(n for _, n in p.rows) * math.prod(info.shape[1:]) if p else math.prod(info.shape))
    costs = _costs(prof, disk_bw or disk_bandwidth(path.parent), len(plan.graphs["decode"].steps),
                   min(prefill_tokens, limits(plan.graphs)["prefill"][0]), fixed_step)
    seq = min(prompt + output, art.max_seq_len or prompt + output)
    per_position, block = kv_bytes_per_position(cache_type), int(cache_type.shape[4])
    kv_bytes = _kv_pool(per_position, block, seq, art.max_seq_len or seq)
    best, alts = search([(u.name, u.bytes) for u in units], budget,
                        kv_bytes=kv_bytes, max_batch=limits(plan.graphs)["decode"][1],
                        kv_layers=int(cache_type.shape[0]),
                        kv_io=kv_traffic(per_position, block, min(prompt, seq), output),
                        pinned=frozenset(pinned_units(plan, units)),
                        prompt=min(prompt, seq), output=output, flops_per_token=2.0 * params, costs=costs,
                        overlap=overlap)
    return OffloadPlan(to_policy(best, budget, alts), best, alts, units, costs)


def load_policy(path, memory_budget, overlap: bool, load_options: dict, workload=None) -> OffloadPolicy:
    """The policy ``ffc.load(path, memory_budget=...)`` runs with; the engine's KV pool, batch
    and tokens per step in ``load_options`` default to the policy's."""
    budget = parse_memory(memory_budget, what="memory_budget")
    w = (Workload.parse(workload, prompt_tokens=512, output_tokens=32) if isinstance(workload, str)
         else workload or FLEXGEN)
    if not isinstance(w, Workload):
        raise InvalidRequestError(f"workload must be a Workload or 'prompt=N,output=M'; got {workload!r}")
    art = Artifact.open(path, check_hashes=load_options.get("check_hashes", True))
    given = load_options.get("max_tokens_per_batch")
    policy = plan_offload(art, budget, prompt=w.prompt_tokens, output=w.output_tokens, overlap=overlap,
                          prefill_tokens=given or streaming_prefill_tokens(limits(art.plan.graphs)["prefill"][0]),
                          fixed_step=given is not None).policy
    if given is None:        # the step size the policy was priced at (each step reads the streamed weights)
        load_options["max_tokens_per_batch"] = policy.summary["step_tokens"]
    if load_options.get("kv_cache_memory") is None:
        load_options["kv_cache_memory"] = max(policy.summary["kv"], 1 << 20)
    if load_options.get("max_requests_per_batch") is None:
        load_options["max_requests_per_batch"] = policy.batch
    return policy


def explain_policy(path, budget) -> str:
    """``ffc inspect ART --policy SIZE``: the units, the numbers the LP priced them with, the
    choice and its alternatives, and which units stay in RAM."""
    art = Artifact.open(path, check_hashes=False)
    budget = parse_memory(budget, what="--policy")
    policy, _, _, units, costs = plan_offload(art, budget)
    mib = 1 << 20
    streamed = [u for u in units if u.name not in policy.resident]
    lines = [f"budget {budget / mib:.1f} MiB for weights, streaming slots and KV cache (the runtime's own memory "
             "is not in it)",
             f"weights: {len(units)} units, {sum(u.bytes for u in units) / mib:.1f} MiB in the kernels' layout "
             f"(largest {max(u.bytes for u in units) / mib:.1f} MiB); gather tables mapped from the weights file",
             f"priced with: memory {costs.memory_bandwidth / 1e9:.1f} GB/s, {costs.flops / 1e9:.0f} GFLOP/s, "
             f"disk {costs.disk_bandwidth / 1e9:.2f} GB/s (page cache bypassed); workload: prompt 512, output 32 "
             f"per sequence, {BLOCK} batches of prompts in flight",
             format_policy(policy.summary),
             "KV cache: " + (f"the last {policy.kv_disk} of {sum(u.layer is not None for u in units)} layers' on "
                             "disk (read into layer slots and written back every step), the others' in RAM"
                             if policy.kv_disk else "in RAM"),
             f"streamed ({len(streamed)}, {sum(u.bytes for u in streamed) / mib:.1f} MiB read per step): "
             + (", ".join(u.name for u in streamed) or "none"),
             f"resident ({len(units) - len(streamed)}): " + (", ".join(u.name for u in units
                                                                      if u.name in policy.resident) or "none")]
    return "\n".join(lines)


def estimate_units(module, weight_dtype: DType) -> tuple[list[tuple[str, int]], frozenset, int]:
    """Before an artifact exists (``ffc compile --dry-run --memory-budget``): the units of the
    forward graph of ``module`` with their bytes, linear and expert weights stored as
    ``weight_dtype`` (an artifact's are its kernels' layout: within a panel's padding of these);
    the units that stay resident (a tied embedding's); and the parameters' count."""
    readers: dict[str, set] = {}
    stored: set[str] = set()
    for n in module.graphs["forward"].nodes:
        for k, v in enumerate(n.inputs):
            if isinstance(v, ParamRef):
                readers.setdefault(v.name, set()).add((n.origin.layer, n.op))
                if k in WEIGHT_INPUTS.get(n.op, ()) and n.op is not Op.EMBEDDING:
                    stored.add(v.name)
    groups: dict[str, float] = {}
    pinned, params = set(), 0
    limit = largest_layer(module)
    nr = QPANEL_ROWS if weight_dtype.quantized else PANEL_ROWS
    for name, rs in readers.items():
        ops = {op for _, op in rs}
        if ops <= {Op.EMBEDDING, Op.TAKE}:
            continue                 # a gather table: mapped from the weights file, not placed
        t = module.params[name].type
        numel = math.prod(int(d) for d in t.shape)
        params += numel
        layers = {layer for layer, _ in rs}
        per = weight_dtype.element_bytes if name in stored else t.dtype.itemsize
        rows = int(t.shape[0]) if t.shape else 1
        chunks = (chunk_rows(rows, param_bytes(t) / rows, nr, limit) if layers == {None} and Op.LINEAR in ops
                  and name in stored else [(0, rows)])
        if len(chunks) > 1:          # an lm_head in row chunks (compiler/lower/split.py); a gather reads a mapping
            for a, n in chunks:
                groups[f"{name}#{a}:{n}"] = n * numel // rows * per
            continue
        key = f"layer {next(iter(layers))}" if len(layers) == 1 and None not in layers else name
        groups[key] = groups.get(key, 0.0) + numel * per
        if Op.EMBEDDING in ops or Op.TAKE in ops:
            pinned.add(key)
    return [(k, -(-int(b) // ALIGN) * ALIGN) for k, b in groups.items()], frozenset(pinned), params


def dry_run_policy(module, budget: int, workload: Workload, profile, kv_per_position: int, *, max_batch: int,
                   prefill_tokens: int, kv_block: int) -> str:
    """What ``ffc compile --dry-run --memory-budget`` prints: the policy a one-rank CPU artifact of
    ``module`` would run under ``budget`` bytes for ``workload`` (prompt and output per
    sequence), its predicted throughput and the alternatives, priced on the parameters' bytes."""
    units, pinned, params = estimate_units(module, workload.weight_dtype)
    store = knobs.cache_dir() / "offload"       # where a load's streamed weights will be read from
    store.mkdir(parents=True, exist_ok=True)
    # kernels per step: every op but the views, before fusion (at most that many); prefill steps
    # as a load under a budget sets them (load_policy)
    msl = workload.max_seq_len
    costs = _costs(profile, disk_bandwidth(store), sum(1 for n in module.graphs["forward"].nodes if n.op not in LAYOUT),
                   min(streaming_prefill_tokens(prefill_tokens), prefill_tokens))
    seq = min(workload.prompt_tokens + workload.output_tokens, msl)
    layers = sum(1 for n, _ in units if n.startswith("layer "))
    prompt = min(workload.prompt_tokens, seq)
    best, alts = search(units, budget, kv_bytes=_kv_pool(kv_per_position, kv_block, seq, msl), max_batch=max_batch,
                        kv_layers=layers, kv_io=kv_traffic(kv_per_position, kv_block, prompt, workload.output_tokens),
                        pinned=pinned, prompt=prompt, output=workload.output_tokens,
                        flops_per_token=2.0 * params, costs=costs)
    mib = 1 << 20
    streamed = [n for n, _ in units if n not in best.resident]
    return "\n".join([
        f"offload policy under --memory-budget {budget / mib:.1f} MiB (one rank, CPU; weights, streaming slots and "
        f"KV cache; priced on the parameters' bytes as {workload.weight_dtype}, disk "
        f"{costs.disk_bandwidth / 1e9:.2f} GB/s; `ffc inspect ART --policy SIZE` prices the artifact's own units):",
        format_policy(to_policy(best, budget, alts).summary),
        f"streamed: {len(streamed)} of {len(units)} units, {sum(b for n, b in units if n in streamed) / mib:.1f} "
        f"MiB read per step"])
