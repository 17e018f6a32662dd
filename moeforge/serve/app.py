"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batched engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true`
answers with server-sent events in OpenAI's chunk format, ending with `data: [DONE]`),
GET /health, GET /metrics (Prometheus text). With an API key, /v1/* require
`Authorization: Bearer KEY`. Errors are OpenAI-style JSON with a 4xx status: malformed JSON,
wrong types, unknown model, a prompt longer than the context, max_tokens out of range
(400/404), too many requests in flight (429). A client that disconnects (streaming or not)
has its request cancelled, which frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from moeforge.infer.engine import Engine, SamplingParams
from moeforge.serve.protocol import APIError, ChatRequest, ChatTemplate, CompletionRequest, parse
from moeforge.serve.worker import EngineWorker, Metrics, Update


def create_app(engine: Engine, tokenizer, model_name: str, template: ChatTemplate | None = None,
               api_key: str | None = None, max_concurrent: int | None = None) -> FastAPI:
    """The FastAPI app; the engine thread starts and stops with the app's lifespan."""
    worker = EngineWorker(engine, max_concurrent or 4 * engine.max_batch)
    metrics = Metrics(worker)
    template = template or ChatTemplate(None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        with worker.lock:  # cancel everything in flight, then stop the thread
            for req in engine.active + engine.prefilling + list(engine.waiting) + list(engine.inbox):
                req.cancelled = True
        worker.stop()

    app = FastAPI(title="moeforge", lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics

    def error(e: APIError, route: str) -> JSONResponse:
        metrics.request_done(route, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    def check_auth(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    def sampling(body: CompletionRequest | ChatRequest, prompt_len: int, default_max: int) -> SamplingParams:
        if body.model != model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        limit = engine.max_len
        if prompt_len >= limit:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {limit} tokens",
                           param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        max_tokens = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = min(default_max, limit - prompt_len)
        if not 1 <= max_tokens <= limit:
            raise APIError(400, f"max_tokens must be between 1 and {limit}, got {max_tokens}", param="max_tokens")
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"context of {limit} tokens; lower max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        stop = body.stop_list()
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, seed=body.seed, stop=stop)

    async def run(request: Request, route: str, chat: bool) -> Response:
        t0 = time.perf_counter()
        try:
            check_auth(request)
            body = parse(ChatRequest if chat else CompletionRequest, await request.body())
            if chat:
                ids = tokenizer.encode(template.render(body.messages)).ids
            else:
                ids = _prompt_ids(body.prompt, tokenizer)
            params = sampling(body, len(ids), 256 if chat else 16)
            if worker.in_flight >= worker.max_concurrent:
                raise APIError(429, f"the server is at its limit of {worker.max_concurrent} concurrent requests; "
                               "retry later", type="rate_limit_error", code="too_many_requests")
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Update] = asyncio.Queue()
            try:
                req = worker.submit(ids, params, loop, queue)
            except ValueError as e:
                raise APIError(400, str(e)) from None
        except APIError as e:
            return error(e, route)
        metrics.prompt_tokens += len(ids)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        info = {"id": rid, "created": int(time.time()), "model": model_name, "chat": chat, "prompt_tokens": len(ids)}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream(req, queue, info, include_usage, metrics, route, t0)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, upd = "", None
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    upd = await asyncio.wait_for(queue.get(), timeout=1.0)
                    text += upd.text
                    if upd.finish_reason is not None:
                        break
                    continue
                if await request.is_disconnected():
                    req.cancelled = True
                    metrics.request_done(route, 499)
                    return Response(status_code=499)
        finally:
            if not req.finished:
                req.cancelled = True
        if upd.finish_reason == "error":
            return error(APIError(500, "the engine failed on this request", type="server_error"), route)
        metrics.completion_tokens += upd.tokens
        metrics.ttft_sum += (req.first_token_at or time.perf_counter()) - req.created
        metrics.ttft_count += 1
        metrics.request_done(route, 200, time.perf_counter() - t0)
        return JSONResponse(_final(info, text, upd))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await run(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await run(request, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            check_auth(request)
        except APIError as e:
            return error(e, "/v1/models")
        metrics.request_done("/v1/models", 200)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(metrics.started), "owned_by": "moeforge"}]})

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "running": engine.running, "waiting": engine.queued})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def bad_method(request: Request, exc: Exception) -> Response:
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    return app


def _prompt_ids(prompt: Any, tokenizer) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt).ids
    if prompt and all(isinstance(p, int) for p in prompt):
        return list(prompt)  # already token ids
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return tokenizer.encode(prompt[0]).ids
    raise APIError(400, "prompt must be a string, a list with one string, or a list of token ids", param="prompt")


def _usage(info: dict, completion: int) -> dict[str, int]:
    p = info["prompt_tokens"]
    return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}


def _final(info: dict, text: str, upd: Update) -> dict[str, Any]:
    if info["chat"]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": upd.finish_reason}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": upd.finish_reason}
        kind = "text_completion"
    return {"id": info["id"], "object": kind, "created": info["created"], "model": info["model"],
            "choices": [choice], "usage": _usage(info, upd.tokens)}


def _chunk(info: dict, text: str | None, finish: str | None, role: bool = False) -> str:
    if info["chat"]:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({} if text is None else
                                                                                    {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    obj = {"id": info["id"], "object": kind, "created": info["created"], "model": info["model"], "choices": [choice]}
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(req, queue: asyncio.Queue, info: dict, include_usage: bool, metrics: Metrics, route: str,
                  t0: float) -> AsyncIterator[str]:
    """SSE events for one request. If the client goes away the generator is closed: cancel the request."""
    try:
        if info["chat"]:
            yield _chunk(info, None, None, role=True)
        while True:
            upd: Update = await queue.get()
            while not queue.empty() and upd.finish_reason is None:
                # the engine got ahead of this stream (several steps since we last ran): send one chunk
                nxt = queue.get_nowait()
                upd = Update(upd.text + nxt.text, nxt.tokens, nxt.finish_reason)
            if upd.finish_reason == "error":
                err = APIError(500, "the engine failed on this request", type="server_error").body()
                yield f"data: {json.dumps(err)}\n\n"
                metrics.request_done(route, 500)
                return
            if upd.text:
                yield _chunk(info, upd.text, None)
            if upd.finish_reason is not None:
                yield _chunk(info, None, upd.finish_reason)
                break
        if include_usage:
            obj = {"id": info["id"], "object": "chat.completion.chunk" if info["chat"] else "text_completion",
                   "created": info["created"], "model": info["model"], "choices": [],
                   "usage": _usage(info, upd.tokens)}
            yield f"data: {json.dumps(obj)}\n\n"
        yield "data: [DONE]\n\n"
        metrics.completion_tokens += upd.tokens
        metrics.ttft_sum += (req.first_token_at or time.perf_counter()) - req.created
        metrics.ttft_count += 1
        metrics.request_done(route, 200, time.perf_counter() - t0)
    finally:
        if not req.finished:
            req.cancelled = True  # disconnected mid-stream: the engine frees the slot at its next step


def serving_threads(cores: int) -> int:
    """Intra-op threads for a CPU server with `cores` threads available: all but one, which the event loop
    (HTTP, streaming) needs. On the 2-core dev CPU with 8 clients, 1 thread instead of 2 took the tiny
    model's server from 158 to 263 tokens/s sequentially and from 539 to 1,035 concurrently
    (benchmarks/serve_load.py): with as many kernel threads as cores, every wake-up of the event loop
    stalls a parallel kernel."""
    return max(1, cores - 1)


def load_server(ckpt: str | Path, device: str | None = None, dtype: str = "auto", max_batch: int = 8,
                max_len: int | None = None, speculative: bool = False, draft_tokens: int = 1, compile: bool = False,
                prefill_chunk: int | None = 512, api_key: str | None = None,
                model_name: str | None = None, max_concurrent: int | None = None,
                threads: int | str | None = None) -> FastAPI:
    """Load a checkpoint folder (or a run folder's newest checkpoint) and build the app.

    `threads`: PyTorch intra-op threads for this process; "auto" (what `moeforge serve` passes) leaves one
    core to the HTTP event loop on a CPU device (`serving_threads`), None leaves the setting alone."""
    import torch
    from tokenizers import Tokenizer

    from moeforge.model.checkpoint import load_model
    from moeforge.train.state import checkpoints

    path = Path(ckpt)
    if path.is_dir() and not (path / "config.json").exists() and checkpoints(path):
        path = checkpoints(path)[0]
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"{path} has no tokenizer.json; the server needs the checkpoint's tokenizer")
    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    if threads not in (None, "auto") and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    model = load_model(path, device=device, dtype=dtypes[dtype])
    if threads == "auto":
        cpu = model.embed_tokens.weight.device.type == "cpu"
        threads = serving_threads(torch.get_num_threads()) if cpu else None
    if threads is not None:
        torch.set_num_threads(threads)
    tok = Tokenizer.from_file(str(tok_file))
    engine = Engine(model, max_batch=max_batch, max_len=max_len, tokenizer=tok, speculative=speculative,
                    draft_tokens=draft_tokens, compile=compile, prefill_chunk=prefill_chunk)
    if compile:  # compile now rather than on the first requests
        print("moeforge: compiling the decode step (once; about a minute on a small CPU)...", file=sys.stderr)
        t0 = time.perf_counter()
        engine.warm_up()
        print(f"moeforge: compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    name = model_name or Path(ckpt).resolve().name
    return create_app(engine, tok, name, ChatTemplate(path), api_key, max_concurrent)
