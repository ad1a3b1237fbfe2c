"""The serving engine: paged KV blocks, the step scheduler (token budget, preemption),
in-flight batching equal to running alone, cancellation."""
import pytest

import ffc
from conftest import PROMPTS
from ffc.ir.types import TensorType
from ffc.runtime.kv_cache import BlockPool
from ffc.util import parse_memory
from ffc.runtime.sampling import SamplingParams, apply_repetition_penalty, draw, sample_rows
from ffc.runtime.scheduler import Request, Scheduler, SchedulerConfig

CACHE = TensorType("f32", (1, 2, "S", 1, 4, 2))   # blocks of 4 positions


def _sched(blocks, budget=8, rows=8, max_seq_len=64):
    pool = BlockPool(CACHE, blocks_per_seq=16, num_blocks=blocks)
    return Scheduler(SchedulerConfig(budget, rows, max_seq_len), pool), pool


def _req(n, new=4, rid=None):
    return Request(rid or f"r{n}", list(range(1, n + 1)), SamplingParams(max_new_tokens=new))


def _run(sched, plan, token=7):
    """What the engine does after a forward: tokens computed, one sampled where complete."""
    for s in plan:
        s.req.computed = s.start + s.n
        if s.req.computed == s.req.num_tokens:
            s.req.out.append(token)
            if len(s.req.out) >= s.req.params.max_new_tokens:
                s.req.finish = "length"
    return sched.retire()


def test_budget_chunks_prefill_and_decodes_go_first():
    sched, pool = _sched(blocks=64, budget=8)
    a, b = _req(10), _req(5)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [(s.req.id, s.start, s.n) for s in plan] == [("r10", 0, 8)]      # a's prompt, chunked
    _run(sched, plan)
    plan = sched.schedule()
    assert [(s.req.id, s.start, s.n) for s in plan] == [("r10", 8, 2), ("r5", 0, 5)]
    _run(sched, plan)
    plan = sched.schedule()                                                 # both decoding
    assert [(s.req.id, s.start, s.n) for s in plan] == [("r10", 10, 1), ("r5", 5, 1)]
    assert len(a.blocks) == pool.blocks_for(11) and len(b.blocks) == pool.blocks_for(6)


def test_blocks_return_when_requests_end():
    sched, pool = _sched(blocks=32)
    reqs = [_req(n, new=3) for n in (3, 6, 9)]
    for r in reqs:
        sched.add(r)
    while sched.has_work():
        _run(sched, sched.schedule())
        assert pool.used_blocks == sum(len(r.blocks) for r in sched.running)
    assert pool.free_blocks == 32 and all(len(r.out) == 3 for r in reqs)
    # an abort between steps frees at the next retire
    r = _req(12)
    sched.add(r)
    _run(sched, sched.schedule())
    assert pool.used_blocks == 2  # the first 8-token chunk of the 12-token prompt
    r.finish = "abort"
    sched.retire()
    assert pool.free_blocks == 32


def test_blocks_behind_every_layers_window_are_freed():
    """Every layer with a sliding window of 6 (kv_window): the blocks no query can see any more
    go back to the pool as a request grows, so one of 50 positions runs in a pool of 24; without
    the window it is refused up front."""
    pool = BlockPool(CACHE, blocks_per_seq=16, num_blocks=6)
    sched = Scheduler(SchedulerConfig(4, 8, 64, kv_window=6), pool)
    r = _req(10, new=40)
    sched.add(r)
    while sched.has_work():
        for s in sched.schedule():
            sched.computed(s.req, s.start + s.n)
            # every block it still holds has a position a next query sees (p - 6 + 1 and on)
            assert r.released == max(0, r.computed - 5) // 4
            assert pool.used_blocks == len(r.blocks) - r.released <= 4
            if r.computed == r.num_tokens:
                r.out.append(7)
                r.finish = "length" if len(r.out) == 40 else None
        sched.retire()
    assert len(r.out) == 40 and r.released == 11 and pool.free_blocks == 6
    with pytest.raises(ffc.InvalidRequestError, match="may grow to 50 tokens = 13 KV blocks"):
        Scheduler(SchedulerConfig(4, 8, 64), pool).add(_req(10, new=40))


def test_newest_is_preempted_and_recomputed():
    # 5 blocks of 4 positions; two requests that grow past what both can hold
    sched, pool = _sched(blocks=5, budget=64)
    old, new = _req(7, new=8, rid="old"), _req(6, new=8, rid="new")
    sched.add(old)
    sched.add(new)
    seen_preempt = False
    while sched.has_work():
        plan = sched.schedule()
        assert plan, "the scheduler must always make progress"
        if new.preemptions and not seen_preempt:
            seen_preempt = True
            assert old in sched.running
        _run(sched, plan)
        assert pool.used_blocks <= 5
    assert seen_preempt and sched.preemptions >= 1 and old.preemptions == 0
    assert len(old.out) == 8 and len(new.out) == 8 and pool.free_blocks == 5


def test_request_larger_than_the_pool_is_refused():
    sched, _ = _sched(blocks=3)
    with pytest.raises(ffc.InvalidRequestError, match="KV blocks"):
        sched.add(_req(10, new=10))


@pytest.mark.parametrize("text,want", [("2GiB", 2 << 30), ("512MB", 512 * 10**6), (1000000, 1000000),
                                       ("1.5k", 1536)])
def test_parse_memory(text, want):
    assert parse_memory(text) == want


@pytest.mark.parametrize("bad", ["lots", "-1GB", 0, True])
def test_parse_memory_rejects(bad):
    with pytest.raises(ffc.InvalidRequestError, match="kv_cache_memory"):
        parse_memory(bad)


# ---------------------------------------------------------------- the real model

def _mix(llm):
    """16 requests of different prompt and output lengths."""
    base = [llm.encode(p) for p in PROMPTS]
    prompts, news = [], []
    for k in range(16):
        ids = base[k % 5] + base[(k + 2) % 5][: k % 7]
        prompts.append(ids)
        news.append(20 + (k * 7) % 41)
    return prompts, news


@pytest.fixture(scope="module")
def alone(smol_llm):
    prompts, news = _mix(smol_llm)
    return [smol_llm.generate([p], max_new_tokens=n, ignore_eos=True).token_ids[0] for p, n in zip(prompts, news)]


def test_sixteen_in_flight_equal_alone(smol_llm, alone):
    """Requests join between steps (staggered) and leave when done; greedy tokens equal alone."""
    prompts, news = _mix(smol_llm)
    eng = smol_llm.engine
    reqs = []
    for k, (p, n) in enumerate(zip(prompts, news)):
        reqs.append(eng.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True)))
        if k % 4 == 3:
            eng.step()
    batch_sizes = []
    while eng.has_work():
        batch_sizes.append(len(eng.scheduler.running))
        eng.step()
    assert max(batch_sizes) >= 8
    assert [r.out for r in reqs] == alone
    assert eng.pool.used_blocks == 0


def test_small_pool_preempts_and_still_completes(smol_artifact, smol_llm, alone):
    blocks = smol_llm.runner.blocks_per_seq       # the least a pool may have: one max_seq_len sequence
    llm = ffc.load(smol_artifact, kv_cache_memory=blocks * BlockPool.bytes_per_block(smol_llm.cache_type))
    prompts, news = _mix(llm)
    assert llm.engine.pool.num_blocks == blocks
    assert sum(llm.engine.pool.blocks_for(len(p) + n) for p, n in zip(prompts, news)) > 1.5 * blocks
    out = llm.generate(prompts, sampling_params=[SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news])
    assert llm.engine.scheduler.preemptions > 0
    assert out.token_ids == alone
    assert llm.engine.pool.used_blocks == 0


def test_cancel_returns_blocks_and_spares_the_rest(smol_llm):
    eng = smol_llm.engine
    ids = smol_llm.encode(PROMPTS[0])
    keep = eng.submit(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
    drop = [eng.submit(ids, SamplingParams(max_new_tokens=40, ignore_eos=True)) for _ in range(3)]
    for _ in range(4):
        eng.step()
    for r in drop:
        eng.abort(r)
    eng.wait([keep])
    assert all(r.finish == "abort" for r in drop) and keep.finish == "length"
    assert keep.out == smol_llm.generate([ids], max_new_tokens=12, ignore_eos=True).token_ids[0]
    assert eng.pool.used_blocks == 0
    # closing a stream early cancels its request
    s = smol_llm.stream(PROMPTS[1], 50, ignore_eos=True)
    next(s)
    s.close()
    assert not eng.has_work() or (eng.step() is not None and eng.pool.used_blocks == 0)
    assert eng.pool.used_blocks == 0


def test_per_request_sampling_in_one_batch(smol_llm):
    """Different sampling settings side by side; seeded sampling repeats; stop strings cut."""
    ps = [SamplingParams(max_new_tokens=8, temperature=0.8, top_k=40, seed=5),
          SamplingParams(max_new_tokens=16, stop=("wizard", "dragon")),
          SamplingParams(max_new_tokens=3, ignore_eos=True)]
    prompts = [PROMPTS[2], PROMPTS[2], PROMPTS[0]]
    a = smol_llm.generate(prompts, sampling_params=ps)
    b = smol_llm.generate(prompts, sampling_params=ps)
    assert a.token_ids == b.token_ids
    assert a.texts[1] == " there was a wise old " and a.finish_reasons[1] == "stop"
    assert len(a.token_ids[2]) == 3 and a.finish_reasons[2] == "length"
    with pytest.raises(ffc.InvalidRequestError, match="sampling_params"):
        smol_llm.generate(prompts, sampling_params=ps[:2])


def test_sampling_a_step_together_equals_sampling_each_alone():
    """A step's sequences are sampled together, grouped by their settings; each seeded row draws
    what it would alone, stays inside its top-k / top-p set, and greedy rows take the argmax
    after their repetition penalty."""
    import torch
    torch.manual_seed(0)
    logits = torch.randn(7, 50) * 3
    seen = torch.tensor([3, 9, 9, 17])
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3),
              SamplingParams(temperature=0.8, top_k=5, seed=1), SamplingParams(temperature=1.0, top_p=0.5, seed=2),
              SamplingParams(temperature=0.8, top_k=5, seed=3), SamplingParams(temperature=1.3, seed=4),
              SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.2, seed=5)]

    def rows(idx):
        return [(params[i], seen, torch.Generator().manual_seed(params[i].seed or 0)) for i in idx]
    together = sample_rows(logits, rows(range(7)))
    assert together == [sample_rows(logits[i:i + 1], rows([i]))[0] for i in range(7)]
    assert together[0] == int(logits[0].argmax())
    assert together[1] == int(apply_repetition_penalty(logits[1], seen, 1.3).argmax())
    assert together[2] in logits[2].topk(5).indices.tolist() and together[4] in logits[4].topk(5).indices.tolist()
    probs, order = torch.softmax(logits[3], -1).sort(descending=True)
    nucleus = order[:int((probs.cumsum(0) < 0.5).sum()) + 1].tolist()
    assert together[3] in nucleus
    # rows of one group draw from their own generators: other seeds, other tokens (over a batch)
    many = sample_rows(logits[[5] * 64], [(params[5], seen, torch.Generator().manual_seed(s)) for s in range(64)])
    assert len(set(many)) > 5


def test_draw_follows_the_distribution():
    """Inverse-transform draws: frequencies within 4 sigma of the probabilities, never a token
    without mass (also at the ends of a row)."""
    import torch
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 20_000
    got = torch.bincount(torch.tensor(draw(p.expand(n, 6), [g] * n)), minlength=6).double() / n
    assert got[p == 0].sum() == 0
    assert ((got - p).abs() <= 4 * (p * (1 - p) / n).sqrt()).all(), got


def test_prefix_cache_pool():
    pool = BlockPool(CACHE, blocks_per_seq=16, num_blocks=4)
    toks = list(range(1, 11))                      # 2 full blocks of 4, and 2 tokens
    keys = pool.keys(toks, [], 2)
    a = pool.allocate(3)
    held = a[:2]                                   # (free() empties the list it is given)
    pool.register(a[:2], keys)
    assert pool.match(pool.keys(toks[:9] + [99], [], 2)) == held
    assert pool.match(pool.keys([1, 2, 3, 5] + toks[4:], [], 2)) == []   # first block differs
    b = pool.acquire(pool.match(keys))             # shared: two references
    pool.free(a)
    assert pool.used_blocks == 2 and pool.free_blocks == 2
    pool.free(b)                                   # cached, idle: still matchable, and allocatable
    assert pool.free_blocks == 4 and pool.match(keys) == held
    pool.allocate(3)                               # the 2 plain free blocks first, then 1 evicted:
    assert pool.match(keys) == held[:1] and pool.free_blocks == 1   # a prefix's tail goes first
    pool.allocate(1)
    assert pool.match(keys) == [] and pool.free_blocks == 0


def test_shared_prefix_is_computed_once(smol_artifact, smol_llm):
    system = ("You are a helpful assistant who answers questions about geography, history and science "
              "in short, precise sentences. You never invent facts; when you are unsure you say so, and "
              "you give the source of every number you quote. Keep every answer under fifty words. ")
    prompts = [system + q for q in ("What is the capital of France?", "Why is the sky blue?",
                                    "Who built the pyramids?")]
    plain = ffc.load(smol_artifact, prefix_caching=False).generate(prompts, max_new_tokens=12, ignore_eos=True)
    eng = smol_llm.engine
    before = eng.pool.hit_tokens
    first = smol_llm.generate(prompts[:1], max_new_tokens=12, ignore_eos=True)
    rest = smol_llm.generate(prompts[1:], max_new_tokens=12, ignore_eos=True)
    bs = eng.pool.block_size
    shared = (len(smol_llm.encode(system)) - 1) // bs * bs   # whole blocks inside the common prefix
    assert shared >= 3 * bs
    assert eng.pool.hit_tokens - before >= 2 * shared
    assert first.token_ids + rest.token_ids == plain.token_ids
    assert eng.pool.used_blocks == 0


def _byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace, byte fallback, the first space stripped)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "</s>": 1, **{f"<0x{i:02X}>": 2 + i for i in range(256)}}
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("o", "x")]
    for tok in [*"▁abcdefghijklmnopqrstuvwxyzé.,:()\n", *(a + b for a, b in merges)]:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "byte-fallback"])
def test_text_as_tokens_arrive_is_the_whole_decode(smol_llm, kind):
    """The engine's text as tokens arrive (a DecodeStream per request: a few tokens decoded a
    step, not the whole output) is a prefix of the whole output's decode at every token and
    equal to it at the last, with characters split across tokens, special tokens among them,
    and (the last text) bytes that never make a character (where the stream cannot go on, the
    request is decoded whole from then); a tokenizer without a tokenizers backend, or with a
    clean-up pass after it, is decoded whole."""
    import random
    from ffc.runtime.detokenize import Detokenizer
    tok = smol_llm.tokenizer if kind == "byte-level" else _byte_fallback_tokenizer()
    det = Detokenizer(tok)
    assert det.backend is not None
    text = "the fox: héllo wörld 你好 🙂👍🏽 (ok)\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    cases = [ids, ids[:3] + [tok.eos_token_id] + ids[3:], ids[:-1] + [ids[-1]] * 2]
    cases += [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    for out in cases:
        req, seen, prev = Request("r", [0], SamplingParams()), [], 0
        for k, t in enumerate(out):
            req.out.append(t)
            got, before = det.text(req, whole=k == len(out) - 1)
            assert before == (0 if req.decoded is False else prev)   # False: the stream gave up, decoded whole
            seen.append(got)
            prev = len(got)
        whole = tok.decode(out, skip_special_tokens=True)
        assert seen[-1] == whole
        if "\ufffd" not in whole:      # (byte fallback turns a whole run of bytes into U+FFFD when it is invalid)
            assert all(whole.startswith(s) for s in seen) and req.decoded is not False
    assert seen_text(det, ids) == text

    class Plain:                       # no tokenizers backend: decoded whole at every token
        def decode(self, out, skip_special_tokens=True):
            return " ".join(map(str, out))
    req = Request("r", [0], SamplingParams(), out=[5, 6])
    assert Detokenizer(Plain()).text(req) == ("5 6", 0)
    cleaned = _byte_fallback_tokenizer()     # a clean-up pass after the backend's decode: decoded whole
    cleaned.clean_up_tokenization_spaces = True
    assert Detokenizer(cleaned).backend is None


def seen_text(det, out) -> str:
    req = Request("r", [0], SamplingParams())
    for t in out:
        req.out.append(t)
        text, _ = det.text(req)
    return text
