"""``ffc serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

Every request becomes an engine request; the engine steps in its own thread and batches
all requests in flight. Streaming answers are server-sent events. A client that goes
away cancels its request (its KV blocks return to the pool). Bad input is a 400 with an
OpenAI-style JSON error naming the field; SIGTERM stops accepting connections, lets the
requests in flight finish, and exits.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Literal, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

import ffc
from ffc.errors import InvalidRequestError

from .engine import releasable
from .sampling import MAX_SEED, SamplingParams
from .scheduler import Request
from .trace import StepTracer

MAX_STOP = 4


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: Optional[str] = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1              # -1 or 0: off
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0   # accepted only at their defaults
    presence_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0
    seed: Optional[Annotated[int, Field(ge=0, le=MAX_SEED)]] = None
    stop: Optional[Union[str, Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)]]] = None
    stream: bool = False
    n: Annotated[int, Field(ge=1, le=1)] = 1
    ignore_eos: bool = False
    user: Optional[str] = None


class CompletionBody(_Sampling):
    prompt: Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=1)] = 16


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None


def _error(status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class _BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    field = ".".join(loc) or None
    if field is None:
        return f"the request body must be a JSON object: {e.get('msg')}", None
    return f"{field}: {e.get('msg')}", field.split(".")[0]


class Metrics:
    """Prometheus text for the engine: state read at scrape time, latency histograms observed
    when requests finish."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        self.registry = CollectorRegistry()
        self.engine = engine

        class _State:
            def collect(_self):
                sch, st, pool = engine.scheduler, engine.stats, engine.pool
                for name, doc, value in (
                        ("ffc_queue_length", "requests waiting to be scheduled", len(sch.waiting)),
                        ("ffc_running_requests", "requests in the running batch", len(sch.running)),
                        ("ffc_kv_blocks_used", "KV-cache blocks in use", pool.used_blocks),
                        ("ffc_kv_blocks_total", "KV-cache blocks in the pool", pool.num_blocks),
                        ("ffc_generation_tokens_per_second", "tokens generated per second, last 10 s",
                         st.tokens_per_second()),
                        ("ffc_spec_acceptance_rate", "speculative decoding: draft tokens accepted / verified",
                         st.spec_accepted / st.spec_proposed if st.spec_proposed else 0.0),
                        ("ffc_tokens_per_step", "tokens generated per engine step",
                         st.generated_tokens / st.steps if st.steps else 0.0)):
                    g = GaugeMetricFamily(name, doc)
                    g.add_metric([], value)
                    yield g
                for name, doc, value in (
                        ("ffc_prompt_tokens", "prompt tokens prefilled", st.prompt_tokens),
                        ("ffc_generation_tokens", "tokens generated", st.generated_tokens),
                        ("ffc_preemptions", "requests preempted for KV blocks", sch.preemptions),
                        ("ffc_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                         pool.hit_tokens),
                        ("ffc_steps", "engine steps run", st.steps),
                        ("ffc_spec_verify_steps", "steps that verified a draft tree", st.verify_steps),
                        ("ffc_spec_draft_tokens", "draft tokens verified (deepest path of each tree)",
                         st.spec_proposed),
                        ("ffc_spec_accepted_tokens", "draft tokens accepted", st.spec_accepted)):
                    c = CounterMetricFamily(name, doc)
                    c.add_metric([], value)
                    yield c
                c = CounterMetricFamily("ffc_requests_finished", "requests finished, by reason", labels=["reason"])
                for reason, count in sorted(st.finished.items()):
                    c.add_metric([reason], count)
                yield c

        self.registry.register(_State())
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("ffc_time_to_first_token_seconds", "arrival to first token", registry=self.registry,
                              buckets=buckets)
        self.tpot = Histogram("ffc_time_per_output_token_seconds", "mean time between output tokens",
                              registry=self.registry, buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15,
                                                               0.2, 0.3, 0.5, 1.0, 2.5))
        self.e2e = Histogram("ffc_request_latency_seconds", "arrival to last token", registry=self.registry,
                             buckets=buckets)
        engine.on_finish.append(self.observe)

    def observe(self, req: Request) -> None:
        if req.finish in ("abort", "error") or req.first_token_at is None:
            return
        self.ttft.observe(req.first_token_at - req.arrival)
        self.e2e.observe((req.finished_at or time.monotonic()) - req.arrival)
        if len(req.out) > 1:
            self.tpot.observe(((req.finished_at or time.monotonic()) - req.first_token_at) / (len(req.out) - 1))

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class _JsonBodies:
    """A POST body is read as JSON whatever content type it declares, as llama.cpp's server
    does: ``curl URL -d '{...}'`` declares a form. Not for a request from a web page (it sends
    an Origin header): a page can post a form or plain text to localhost without a CORS
    preflight, and only a JSON content type (which needs one) may reach the endpoints then."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = list(scope["headers"])
            names = {k.lower() for k, _ in headers}
            declared = next((v for k, v in headers if k.lower() == b"content-type"), b"").lower()
            if b"json" not in declared and b"origin" not in names:
                headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


def create_app(llm, model_name: Optional[str] = None, speculative: Optional[str] = None) -> FastAPI:
    """The HTTP app for a loaded ``LLM``; its engine loop runs while the app is up.
    ``speculative``: every request is decoded with this draft (``LLM.draft``'s names)."""
    if speculative is not None:
        speculative = llm.draft(speculative)
        llm.engine.speculation.check(speculative, llm.runner)
    engine = llm.engine
    name = model_name or llm.manifest.get("model", {}).get("name") or llm.path.name
    created = int(time.time())
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop(drain=True, timeout=60)

    app = FastAPI(title="ffc", lifespan=lifespan)
    app.add_middleware(_JsonBodies)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param)

    @app.exception_handler(_BadRequest)
    async def _bad(request, exc: _BadRequest):
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(InvalidRequestError)
    async def _ffc_invalid(request, exc: InvalidRequestError):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "ffc",
                                            "max_model_len": llm.max_seq_len}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    def _params(body: _Sampling, max_tokens: int) -> SamplingParams:
        if body.model is not None and body.model != name:
            raise _BadRequest(f"model {body.model!r} is not served here; this server has {name!r}", "model", 404)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stop):
            raise _BadRequest("stop: stop strings must not be empty", "stop")
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
                              top_k=max(body.top_k, 0), top_p=body.top_p,
                              repetition_penalty=body.repetition_penalty, seed=body.seed, stop=stop,
                              ignore_eos=body.ignore_eos)

    def _check_length(ids: list[int], max_tokens: Optional[int], field: str) -> int:
        room = llm.max_seq_len - len(ids)
        if room < 1:
            raise _BadRequest(f"{field}: the prompt has {len(ids)} tokens, but the context is {llm.max_seq_len} "
                              "tokens; shorten it", field)
        if max_tokens is not None and max_tokens > room:
            raise _BadRequest(f"max_tokens: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed the context "
                              f"of {llm.max_seq_len} tokens; ask for at most {room}", "max_tokens")
        return max_tokens if max_tokens is not None else room

    async def _run(http: HTTPRequest, ids: list[int], params: SamplingParams, stream: bool, chunk, final):
        """Submit, then answer: SSE chunks when streaming (``chunk`` may return None to skip
        one), else one JSON body from ``final``."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        req = engine.submit(ids, params, listener=lambda _r: loop.call_soon_threadsafe(wake.set), draft=speculative)
        hold = max((len(s) for s in params.stop), default=1) - 1

        async def events():
            sent = 0
            try:
                first = True
                while True:
                    await wake.wait()
                    wake.clear()
                    done = req.finished
                    text = req.text
                    end = releasable(text, sent, hold, done)
                    if end > sent or first or done:
                        c = chunk(text[sent:end], req.finish if done else None, first)
                        if c is not None:
                            yield f"data: {json.dumps(c)}\n\n"
                        sent, first = end, False
                    if done:
                        break
                if req.finish == "error":
                    yield f"data: {json.dumps({'error': {'message': req.error, 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not req.finished:
                    engine.abort(req)

        if stream:
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while not req.finished:
                try:
                    await asyncio.wait_for(wake.wait(), 0.25)
                    wake.clear()
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        engine.abort(req)
                        return _error(499, "client disconnected", kind="cancelled")
        finally:
            if not req.finished:
                engine.abort(req)
        if req.finish == "error":
            return _error(500, f"generation failed: {req.error}", kind="server_error")
        return final(req)

    def _usage(req: Request) -> dict:
        return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.out),
                "total_tokens": len(req.prompt) + len(req.out)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        try:
            ids = llm.prompt_ids(body.prompt)
        except InvalidRequestError as e:
            raise _BadRequest(f"prompt: {e}", "prompt") from None
        params = _params(body, _check_length(ids, body.max_tokens, "prompt"))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta, finish, first):
            if not delta and finish is None:
                return None
            return {"id": rid, "object": "text_completion", "created": now, "model": name,
                    "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]}

        def final(req):
            return {"id": rid, "object": "text_completion", "created": now, "model": name,
                    "choices": [{"index": 0, "text": req.text, "logprobs": None, "finish_reason": req.finish}],
                    "usage": _usage(req)}
        return await _run(http, ids, params, body.stream, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        try:
            ids = llm.encode(llm.chat_prompt([m.model_dump() for m in body.messages]), add_special_tokens=False)
        except InvalidRequestError as e:
            raise _BadRequest(f"messages: {e}", "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(body, _check_length(ids, max_tokens, "messages"))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta, finish, first):
            d = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                    "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]}

        def final(req):
            return {"id": rid, "object": "chat.completion", "created": now, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": req.text},
                                 "logprobs": None, "finish_reason": req.finish}],
                    "usage": _usage(req)}
        return await _run(http, ids, params, body.stream, chunk, final)

    return app


def serve(artifact: str, host: str = "127.0.0.1", port: int = 8000, model_name: Optional[str] = None,
          log_level: str = "info", speculative: Optional[str] = None, trace_dir: Optional[str] = None,
          trace_every: int = 100, **engine) -> None:
    """Load ``artifact`` and serve it until SIGINT/SIGTERM (which drain the requests in flight);
    with ``trace_dir``, every ``trace_every``-th engine step's timeline is written there."""
    import uvicorn

    llm = ffc.load(artifact, **engine)
    if trace_dir is not None:
        llm.engine.tracer = StepTracer(llm.runner, trace_dir, trace_every)
    app = create_app(llm, model_name, speculative)
    # The engine thread gives up the GIL around every kernel call and torch op; with many streams
    # the HTTP thread is always runnable, and at the default 5 ms switch interval each re-acquire
    # can stall a step that long. A short interval keeps the engine's steps near their kernel time.
    sys.setswitchinterval(0.0005)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=120)
