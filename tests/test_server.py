"""`ffc serve` over real HTTP against a real uvicorn process: completions and chat, streamed
and not; 4xx for bad input; cancellation by disconnect; metrics; SIGTERM drains."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import PROMPTS
from ffc.util import free_port


class Server:
    def __init__(self, artifact, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "ffc.cli", "serve", str(artifact), "--port",
                                      str(self.port), "--log-level", "warning", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not come up in 180 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def metrics(self) -> dict:
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out


@pytest.fixture(scope="module")
def server(smol_artifact):
    s = Server(smol_artifact, "--kv-cache-memory", "1GiB")
    yield s
    s.stop()


def _sse(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_plain_and_streamed(server, smol_llm):
    want = smol_llm.generate(PROMPTS[0], max_new_tokens=20)
    body = {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "text_completion" and j["choices"][0]["text"] == want.texts[0]
    assert j["choices"][0]["finish_reason"] == want.finish_reasons[0]
    assert j["usage"]["completion_tokens"] == len(want.token_ids[0])
    r = httpx.post(server.url + "/v1/completions", json=dict(body, stream=True), timeout=120)
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    assert len(chunks) > 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.texts[0]
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reasons[0]
    # token-id prompts and stop strings
    ids = smol_llm.encode(PROMPTS[1])
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ids, "max_tokens": 24, "temperature": 0,
                                                        "stop": ["\n\n"]}, timeout=120)
    want = smol_llm.generate([ids], max_new_tokens=24, stop="\n\n")
    assert r.json()["choices"][0]["text"] == want.texts[0]


def test_chat_plain_and_streamed(server, smol_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = smol_llm.generate([messages], max_new_tokens=24, chat=True).texts[0]
    body = {"messages": messages, "max_tokens": 24, "temperature": 0}
    j = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert j["object"] == "chat.completion"
    assert j["choices"][0]["message"] == {"role": "assistant", "content": want}
    r = httpx.post(server.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=120)
    chunks = _sse(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_health_metrics(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    m = server.metrics()
    for name in ("ffc_queue_length", "ffc_running_requests", "ffc_kv_blocks_used", "ffc_kv_blocks_total",
                 "ffc_generation_tokens_per_second", "ffc_time_to_first_token_seconds_count",
                 "ffc_time_per_output_token_seconds_count"):
        assert name in m, name
    assert m["ffc_kv_blocks_total"] > 0


def _bad_requests(model_len: int) -> list:
    """(path, raw body or json) of 100 malformed or invalid requests."""
    C, CH = "/v1/completions", "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    base = [
        (C, b"{not json"), (C, b""), (C, b"[1, 2]"), (C, b'"a string"'), (C, b"null"),
        (C, {}), (C, {"prompt": ""}), (C, {"prompt": 5}), (C, {"prompt": None}), (C, {"prompt": [1, "a"]}),
        (C, {"prompt": [-1]}), (C, {"prompt": [10**9]}), (C, {"prompt": []}), (C, {"prompt": "x", "max_tokens": 0}),
        (C, {"prompt": "x", "max_tokens": "5"}), (C, {"prompt": "x", "max_tokens": 1.5}),
        (C, {"prompt": "x", "max_tokens": True}), (C, {"prompt": "x", "temperature": -1}),
        (C, {"prompt": "x", "temperature": 3}), (C, {"prompt": "x", "temperature": "hot"}),
        (C, {"prompt": "x", "top_p": 0}), (C, {"prompt": "x", "top_p": 1.5}), (C, {"prompt": "x", "top_k": -5}),
        (C, {"prompt": "x", "n": 2}), (C, {"prompt": "x", "stop": 3}), (C, {"prompt": "x", "stop": [""]}),
        (C, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), (C, {"prompt": "x", "stream": "yes"}),
        (C, {"prompt": "x", "seed": "1"}), (C, {"prompt": "x", "repetition_penalty": 0}),
        (C, {"prompt": "x", "seed": 2**64, "temperature": 0.5}), (C, {"prompt": "x", "seed": -2**70}),
        (C, {"prompt": "x", "model": "no-such-model"}), (C, {"prompt": "x", "frequency_penalty": 1.0}),
        (C, {"prompt": "hello " * (model_len + 10)}), (C, {"prompt": "x", "max_tokens": model_len * 4}),
        (CH, {}), (CH, {"messages": []}), (CH, {"messages": "hi"}), (CH, {"messages": [{"role": "user"}]}),
        (CH, {"messages": [{"role": "wizard", "content": "hi"}]}), (CH, {"messages": [{"content": "hi"}]}),
        (CH, {"messages": [{"role": "user", "content": 5}]}), (CH, {"messages": msgs, "max_tokens": -3}),
        (CH, {"messages": msgs, "temperature": None}), (CH, {"messages": msgs, "top_p": "all"}),
        (CH, {"messages": [{"role": "user", "content": "hi " * (model_len + 10)}]}),
        (CH, b"{\"messages\": [}"), (CH, {"messages": msgs, "max_completion_tokens": 0}),
    ]
    out = []
    k = 0
    while len(out) < 100:
        path, body = base[k % len(base)]
        if k >= len(base) and isinstance(body, dict):  # variations: the same fault with another valid field
            body = dict(body, user=f"u{k}")
        out.append((path, body))
        k += 1
    return out


def test_hundred_bad_requests_get_4xx(server, smol_llm):
    for path, body in _bad_requests(smol_llm.max_seq_len):
        if isinstance(body, bytes):
            r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
        else:
            r = httpx.post(server.url + path, json=body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], (path, body)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "temperature": 3})
    assert r.json()["error"]["param"] == "temperature"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "seed": 2**64, "temperature": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    # the README's curl -d examples declare a form: the body is JSON all the same, but not from a web page
    body = json.dumps({"prompt": PROMPTS[3], "max_tokens": 4, "temperature": 0}).encode()
    want4 = smol_llm.generate(PROMPTS[3], max_new_tokens=4).texts[0]
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}, {}):
        r = httpx.post(server.url + "/v1/completions", content=body, headers=headers, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want4, headers
    r = httpx.post(server.url + "/v1/completions", content=body, timeout=120,
                   headers={"content-type": "text/plain", "origin": "https://elsewhere.example"})
    assert 400 <= r.status_code < 500
    assert httpx.get(server.url + "/health").status_code == 200
    want = smol_llm.generate(PROMPTS[3], max_new_tokens=12).texts[0]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0},
                   timeout=120)
    assert r.json()["choices"][0]["text"] == want


def test_fifty_cancelled_streams(server, smol_llm):
    """50 streams dropped after their first tokens; requests alongside stay correct; every KV
    block comes back."""
    keep = [(PROMPTS[k], 16) for k in range(3)]
    want = [smol_llm.generate(p, max_new_tokens=n).texts[0] for p, n in keep]

    async def cancelled(client, k):
        body = {"prompt": PROMPTS[k % 5], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got == 2:
                        return True   # leaving the block closes the connection mid-stream
        return False

    async def normal(client, prompt, n):
        r = await client.post(server.url + "/v1/completions",
                              json={"prompt": prompt, "max_tokens": n, "temperature": 0})
        return r.json()["choices"][0]["text"]

    async def main():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=100)) as client:
            tasks = [cancelled(client, k) for k in range(50)] + [normal(client, p, n) for p, n in keep]
            return await asyncio.gather(*tasks)

    res = asyncio.run(main())
    assert all(res[:50]) and res[50:] == want
    deadline = time.time() + 60
    while time.time() < deadline:
        m = server.metrics()
        if m["ffc_kv_blocks_used"] == 0 and m["ffc_running_requests"] == 0 and m["ffc_queue_length"] == 0:
            break
        time.sleep(0.2)
    assert m["ffc_kv_blocks_used"] == 0, m
    assert m['ffc_requests_finished_total{reason="abort"}'] >= 50


def test_sigterm_drains_then_exits(smol_artifact, smol_llm):
    srv = Server(smol_artifact, "--kv-cache-memory", "256MiB")
    try:
        want = smol_llm.generate(PROMPTS[2], max_new_tokens=48, ignore_eos=True).texts[0]
        body = {"prompt": PROMPTS[2], "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
        text = []
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            sent = False
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text.append(json.loads(line[6:])["choices"][0]["text"])
                if not sent:
                    os.kill(srv.proc.pid, signal.SIGTERM)
                    sent = True
        assert "".join(text) == want          # the request in flight finished
        # then the server exited: uvicorn re-raises the signal after its graceful shutdown
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=2)
    finally:
        srv.stop()


def test_speculative_server_streams_what_plain_decoding_gives(smol_artifact, smol_llm):
    """`ffc serve --speculative ngram`: concurrent streamed requests (continuous batching with
    trees) answer plain greedy decoding's text; /metrics reports the drafts' acceptance."""
    text = "Repeat exactly: the red fox and the blue fox and the red fox and the blue fox and the red"
    prompts = [text, PROMPTS[0], text + " fox", PROMPTS[2]]
    want = smol_llm.generate(prompts, max_new_tokens=32).texts
    s = Server(smol_artifact, "--kv-cache-memory", "256MiB", "--speculative", "ngram")
    try:
        async def one(client, prompt):
            r = await client.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 32,
                                                                 "temperature": 0, "stream": True}, timeout=120)
            return "".join(c["choices"][0]["text"] for c in _sse(r.text))

        async def all_():
            async with httpx.AsyncClient() as client:
                return await asyncio.gather(*(one(client, p) for p in prompts))
        assert asyncio.run(all_()) == want
        m = s.metrics()
        assert m["ffc_spec_verify_steps_total"] > 0 and 0 < m["ffc_spec_acceptance_rate"] <= 1
        assert m["ffc_tokens_per_step"] > 1
    finally:
        s.stop()
