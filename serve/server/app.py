"""The FastAPI app: ``build_app(runtime)``. Handlers validate, tokenize, enqueue and await;
everything JAX runs on the runtime's engine thread (``serve.server.runtime``).

Routes: ``GET /health``, ``GET /metrics`` (open); ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``POST /v1/models/load`` and ``/v1/models/unload`` (with
``allow_model_management``), all behind the API key when one is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from serve.scheduler import Request
from serve.server import protocol as p
from serve.server.errors import APIError, error_response
from serve.server.models import BASE, Mismatch, check_task, load_task
from serve.server.runtime import Chunk, Runtime, Submission
from sunjax.tokenizer import chat_prompt

log = logging.getLogger("sunjax.serve")
MAX_BODY = 1 << 20  # bytes


# -- request plumbing ----------------------------------------------------------------------
async def read_json(request: HTTPRequest) -> dict:
    """The body as a JSON object: 413 over ``MAX_BODY``, 400 when it is not a JSON object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise APIError(
            413,
            f"request body of {length} bytes exceeds the limit of {MAX_BODY} bytes",
            code="request_too_large",
        )
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            raise APIError(
                413,
                f"request body exceeds the limit of {MAX_BODY} bytes",
                code="request_too_large",
            )
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(
            400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    return data


def parse(model_cls: type[p._Strict], body: dict):
    field = p.unsupported_field(body)
    if field is not None:
        raise APIError(
            400,
            f"{field}={body[field]!r} is not supported by this server",
            param=field,
            code="unsupported_parameter",
        )
    return model_cls.model_validate(p.strip_neutral(body))


async def until_disconnected(request: HTTPRequest) -> None:
    """Returns when the client has gone (the body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def clean(x: float) -> float:
    """JSON has no -inf: a token outside the sampled cut reports -9999."""
    return max(x, -9999.0)


# -- the app ---------------------------------------------------------------------------------
def build_app(
    runtime: Runtime,
    *,
    api_key: str | None = None,
    allow_model_management: bool = False,
    export_root: str | None = None,
    on_startup: Callable[[], None] | None = None,
) -> FastAPI:
    """The web app over an engine handle. ``runtime.start`` is called at startup (on the
    serving event loop) and ``runtime.stop`` at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start(asyncio.get_running_loop())
        if on_startup is not None:
            on_startup()
        yield
        runtime.stop()

    app = FastAPI(title="sunjax", lifespan=lifespan, docs_url=None, redoc_url=None)
    for exc in (
        APIError,
        RequestValidationError,
        ValidationError,
        HTTPException,
        ValueError,
        Exception,
    ):
        app.add_exception_handler(exc, lambda _req, e: error_response(e))

    async def check_key(request: HTTPRequest) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
            )

    def check_ready() -> None:
        if not runtime.ready:
            raise APIError(
                503,
                f"the server is {runtime.state}",
                code=runtime.state,
                headers={"Retry-After": "1"},
            )

    @app.get("/health")
    async def health() -> Response:
        body = {"status": runtime.state, **runtime.health()}
        if runtime.error is not None:
            body["error"] = repr(runtime.error)
        return JSONResponse(body, status_code=200 if runtime.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from serve.server.metrics import CONTENT_TYPE

        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def list_models() -> p.ModelList:
        check_ready()
        ms = runtime.model_set
        return p.ModelList(
            data=[
                p.ModelCard(
                    id=m.name,
                    created=m.created,
                    root=m.root,
                    parent=None if m.name == BASE else BASE,
                    decode_fingerprint=ms.decode_fingerprint,
                    quantization=ms.quantization,
                )
                for m in runtime.models.values()
            ]
        )

    def model_of(name: str) -> None:
        if name not in runtime.models:
            raise APIError(
                404,
                f"model {name!r} is not served; served: {sorted(runtime.models)}",
                param="model",
                code="model_not_found",
            )

    def tokenizer():
        return runtime.model_set.tokenizer

    def requests_for(
        body: p._Sampling,
        prompt: list[int],
        *,
        max_tokens: int | None,
        max_tokens_param: str,
        prompt_param: str,
        logprobs: int | None,
    ) -> list[Request]:
        max_len = runtime.sched.pool.config.max_len
        vocab = runtime.model_set.cfg.vocab_size
        if not prompt:
            raise APIError(400, "the prompt is empty", param=prompt_param, code="invalid_value")
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"token id {bad} is outside the vocabulary [0, {vocab})",
                param=prompt_param,
                code="invalid_value",
            )
        if len(prompt) >= max_len:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this server's context is "
                f"{max_len} tokens (--max-len), prompt and output together",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = max_len - len(prompt)
        elif len(prompt) + max_tokens > max_len:
            raise APIError(
                400,
                f"prompt of {len(prompt)} tokens + {max_tokens_param}={max_tokens} "
                f"exceeds this server's context of {max_len} tokens (--max-len)",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        try:
            stop = body.stop_strings()
        except ValueError as e:
            raise APIError(400, str(e), param="stop", code="invalid_value") from None
        if stop and tokenizer() is None:
            raise APIError(
                400,
                "stop strings need a tokenizer; this model has none",
                param="stop",
                code="invalid_value",
            )
        if body.stream_options is not None and not body.stream:
            raise APIError(
                400,
                "stream_options is only allowed with stream=true",
                param="stream_options",
                code="invalid_value",
            )
        seed = secrets.randbits(32) if body.seed is None else body.seed
        rid = uuid.uuid4().hex
        return [
            Request(
                id=f"{rid}-{i}",
                model=body.model,
                prompt=tuple(prompt),
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_k=max(body.top_k, 0),
                top_p=body.top_p,
                seed=(seed + i) % 2**32,
                stop=stop,
                logprobs=logprobs,
            )
            for i in range(body.n)
        ]

    async def collect(sub: Submission, request: HTTPRequest) -> list[list[Chunk]]:
        """Every choice's chunks; cancels the request if the client goes away first."""
        chunks: list[list[Chunk]] = [[] for _ in sub.ids]
        left = len(sub.ids)
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            while left:
                get = asyncio.ensure_future(sub.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ClientGone
                event = get.result()
                if isinstance(event, APIError):
                    raise event
                chunks[event.index].append(event)
                left -= event.finish_reason is not None
            return chunks
        finally:
            gone.cancel()
            if left:
                runtime.cancel(sub)

    def usage(sub: Submission, completion_tokens: int) -> p.Usage:
        return p.Usage(
            prompt_tokens=sub.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=sub.prompt_tokens + completion_tokens,
        )

    def token_str(tid: int) -> str:
        tok = tokenizer()
        return tok.decode([tid]) if tok is not None else str(tid)

    def completion_logprobs(chunks: list[Chunk], offset: int) -> p.CompletionLogprobs:
        tokens = [t for c in chunks for t in c.tokens]
        strs = [token_str(t) for t in tokens]
        offsets, at = [], offset
        for s in strs:
            offsets.append(at)
            at += len(s)
        return p.CompletionLogprobs(
            tokens=strs,
            token_logprobs=[clean(x) for c in chunks for x in c.logprobs],
            top_logprobs=[
                {token_str(i): clean(x) for i, x in top} for c in chunks for top in c.top_logprobs
            ],
            text_offset=offsets,
        )

    def chat_logprobs(chunks: list[Chunk]) -> p.ChoiceLogprobs:
        def entry(tid: int, lp: float) -> dict:
            s = token_str(tid)
            return {"token": s, "logprob": clean(lp), "bytes": list(s.encode())}

        return p.ChoiceLogprobs(
            content=[
                p.TokenLogprob(
                    **entry(t, lp), top_logprobs=[p.TopLogprob(**entry(i, x)) for i, x in top]
                )
                for c in chunks
                for t, lp, top in zip(c.tokens, c.logprobs, c.top_logprobs, strict=True)
            ]
        )

    async def run(request: HTTPRequest, body: p._Sampling, reqs: list[Request], render) -> Response:
        check_ready()
        sub = await runtime.submit(reqs, len(reqs[0].prompt))
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def frames() -> AsyncIterator[str]:
                try:
                    async for frame in render.stream(sub, created, include_usage):
                        yield frame
                finally:  # a no-op once every choice finished; else the client left
                    runtime.cancel(sub)

            return StreamingResponse(
                frames(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            chunks = await collect(sub, request)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(render.whole(sub, created, chunks).model_dump())

    async def events(sub: Submission) -> AsyncIterator[Chunk]:
        """A submission's chunks as they come, until every choice has finished. Whatever
        arrived since the last read is merged per choice: a stream that fell behind the engine
        catches up in one frame per choice instead of one per decode step."""
        left = len(sub.ids)
        while left:
            batch = [await sub.events.get()]
            while not sub.events.empty():
                batch.append(sub.events.get_nowait())
            merged: dict[int, Chunk] = {}
            error = None
            for event in batch:
                if isinstance(event, APIError):
                    error = event
                    break
                before = merged.get(event.index)
                merged[event.index] = event if before is None else before.then(event)
            for chunk in merged.values():
                left -= chunk.finish_reason is not None
                yield chunk
            if error is not None:
                raise error

    async def stream_events(sub: Submission, body_of) -> AsyncIterator[str]:
        """SSE frames: each chunk rendered by ``body_of``; an error after the stream started
        is an ``error`` event; always ends with ``[DONE]``."""
        try:
            async for chunk in events(sub):
                for frame in body_of(chunk):
                    yield sse(frame)
        except APIError as e:
            yield sse(e.body(), event="error")
        yield sse("[DONE]")

    class CompletionRender:
        def __init__(self, body: p.CompletionRequest):
            self.body = body

        def whole(self, sub, created, chunks) -> p.Completion:
            choices = [
                p.CompletionChoice(
                    index=i,
                    text="".join(c.text for c in cs),
                    logprobs=None if self.body.logprobs is None else completion_logprobs(cs, 0),
                    finish_reason=cs[-1].finish_reason,
                )
                for i, cs in enumerate(chunks)
            ]
            n = sum(len(c.tokens) for cs in chunks for c in cs)
            return p.Completion(
                id=f"cmpl-{sub.ids[0][:-2]}",
                created=created,
                model=sub.model,
                choices=choices,
                usage=usage(sub, n),
            )

        async def stream(self, sub, created, include_usage) -> AsyncIterator[str]:
            rid, n, offsets = f"cmpl-{sub.ids[0][:-2]}", 0, [0] * len(sub.ids)

            def frames(c: Chunk):
                nonlocal n
                n += len(c.tokens)
                lp = None
                if self.body.logprobs is not None:
                    lp = completion_logprobs([c], offsets[c.index])
                    offsets[c.index] += sum(len(s) for s in lp.tokens)
                choice = p.CompletionChoice(
                    index=c.index, text=c.text, logprobs=lp, finish_reason=c.finish_reason
                )
                out = [p.Completion(id=rid, created=created, model=sub.model, choices=[choice])]
                if include_usage and len(done) + 1 == len(sub.ids) and c.finish_reason:
                    out.append(
                        p.Completion(
                            id=rid,
                            created=created,
                            model=sub.model,
                            choices=[],
                            usage=usage(sub, n),
                        )
                    )
                if c.finish_reason:
                    done.add(c.index)
                return [o.model_dump() for o in out]

            done: set[int] = set()
            async for frame in stream_events(sub, frames):
                yield frame

    class ChatRender:
        def __init__(self, body: p.ChatCompletionRequest):
            self.body = body

        def whole(self, sub, created, chunks) -> p.ChatCompletion:
            choices = [
                p.ChatChoice(
                    index=i,
                    message=p.AssistantMessage(content="".join(c.text for c in cs)),
                    logprobs=chat_logprobs(cs) if self.body.logprobs else None,
                    finish_reason=cs[-1].finish_reason,
                )
                for i, cs in enumerate(chunks)
            ]
            n = sum(len(c.tokens) for cs in chunks for c in cs)
            return p.ChatCompletion(
                id=f"chatcmpl-{sub.ids[0][:-2]}",
                created=created,
                model=sub.model,
                choices=choices,
                usage=usage(sub, n),
            )

        async def stream(self, sub, created, include_usage) -> AsyncIterator[str]:
            rid, n = f"chatcmpl-{sub.ids[0][:-2]}", 0
            started: set[int] = set()
            done: set[int] = set()

            def chunk_of(choices, use=None):
                return p.ChatCompletionChunk(
                    id=rid, created=created, model=sub.model, choices=choices, usage=use
                ).model_dump()

            def frames(c: Chunk):
                nonlocal n
                n += len(c.tokens)
                out = []
                if c.index not in started:
                    started.add(c.index)
                    delta = p.Delta(role="assistant", content="")
                    out.append(chunk_of([p.ChatChunkChoice(index=c.index, delta=delta)]))
                lp = chat_logprobs([c]) if self.body.logprobs else None
                if c.text or lp is not None and lp.content:
                    choice = p.ChatChunkChoice(
                        index=c.index, delta=p.Delta(content=c.text), logprobs=lp
                    )
                    out.append(chunk_of([choice]))
                if c.finish_reason:
                    done.add(c.index)
                    choice = p.ChatChunkChoice(
                        index=c.index, delta=p.Delta(), finish_reason=c.finish_reason
                    )
                    out.append(chunk_of([choice]))
                    if include_usage and len(done) == len(sub.ids):
                        out.append(chunk_of([], usage(sub, n)))
                return out

            async for frame in stream_events(sub, frames):
                yield frame

    @v1.post("/completions")
    async def completions(request: HTTPRequest) -> Response:
        body = parse(p.CompletionRequest, await read_json(request))
        check_ready()
        model_of(body.model)
        if isinstance(body.prompt, str):
            if tokenizer() is None:
                raise APIError(
                    400,
                    "text prompts need a tokenizer; send token ids",
                    param="prompt",
                    code="invalid_value",
                )
            prompt = tokenizer().encode(body.prompt)
        else:
            prompt = list(body.prompt)
        reqs = requests_for(
            body,
            prompt,
            max_tokens=body.max_tokens,
            max_tokens_param="max_tokens",
            prompt_param="prompt",
            logprobs=body.logprobs,
        )
        return await run(request, body, reqs, CompletionRender(body))

    @v1.post("/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        body = parse(p.ChatCompletionRequest, await read_json(request))
        check_ready()
        model_of(body.model)
        if tokenizer() is None:
            raise APIError(
                400,
                f"model {body.model!r} has no tokenizer (chat template)",
                param="model",
                code="invalid_value",
            )
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(
                400,
                "give max_tokens or max_completion_tokens, not both",
                param="max_completion_tokens",
                code="invalid_value",
            )
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(
                400,
                f"top_logprobs={body.top_logprobs} needs logprobs=true",
                param="top_logprobs",
                code="invalid_value",
            )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        try:
            prompt = chat_prompt(tokenizer(), messages)
        except Exception as e:  # the template rejects the conversation (e.g. role order)
            raise APIError(
                400,
                f"the chat template rejects these messages: {e}",
                param="messages",
                code="invalid_value",
            ) from None
        limit = body.max_completion_tokens or body.max_tokens
        reqs = requests_for(
            body,
            prompt,
            max_tokens=limit,
            max_tokens_param="max_completion_tokens"
            if body.max_completion_tokens
            else "max_tokens",
            prompt_param="messages",
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
        return await run(request, body, reqs, ChatRender(body))

    def resolve_export(path: str) -> str:
        if export_root is None:
            raise APIError(
                403, "model loading needs --export-root", param="path", code="no_export_root"
            )
        root = os.path.realpath(export_root)
        full = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise APIError(
                403,
                f"path {path!r} resolves outside --export-root",
                param="path",
                code="path_outside_root",
            )
        if not os.path.isdir(full):
            raise APIError(
                404,
                f"no export directory at {path!r} under --export-root",
                param="path",
                code="export_not_found",
            )
        return full

    def management() -> None:
        if not allow_model_management:
            raise APIError(
                403,
                "model management is off (start with --allow-model-management)",
                code="model_management_disabled",
            )
        if runtime.policy != "sun":
            raise APIError(
                400,
                f"model management needs --policy sun, not {runtime.policy}",
                code="invalid_value",
            )
        check_ready()

    @v1.post("/models/load")
    async def load_model(request: HTTPRequest) -> Response:
        management()
        body = parse(p.LoadRequest, await read_json(request))
        root = resolve_export(body.path)
        if body.name in runtime.models:
            raise APIError(
                409, f"model {body.name!r} is already served", param="name", code="exists"
            )
        ms = runtime.model_set
        remote = runtime.remote_models  # a cluster: a prefill instance loads the module
        try:
            if remote:
                await asyncio.to_thread(check_task, root, body.name, ms.decode_fingerprint)
            else:
                model = await asyncio.to_thread(
                    load_task, root, body.name, ms.decode_fingerprint, ms.decode
                )
        except Mismatch as e:
            raise APIError(409, str(e), param="path", code="fingerprint_mismatch") from None
        except ValueError as e:
            raise APIError(400, str(e), param="path", code="invalid_export") from None
        if remote:
            await runtime.load_remote(body.name, root)
        else:
            await runtime.load(model)
        return JSONResponse({"loaded": body.name})

    @v1.post("/models/unload")
    async def unload_model(request: HTTPRequest) -> Response:
        management()
        body = parse(p.UnloadRequest, await read_json(request))
        await runtime.unload(body.name)
        return JSONResponse({"unloaded": body.name})

    app.include_router(v1)
    return app
