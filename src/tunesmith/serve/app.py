"""`tunesmith serve`: an OpenAI-compatible HTTP server over one base and many LoRA adapters.

Routes: /v1/chat/completions, /v1/completions (both with server-sent-event streaming),
/v1/models, the admin-only /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names),
and /health. Errors use OpenAI's body shape; a bad request is always a 4xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from tunesmith.errors import TunesmithError
from tunesmith.config import DEFAULT_MODEL
from tunesmith.serve.engine import Completion, Request
from tunesmith.serve.schemas import ChatBody, CompletionBody, LoadAdapterBody, UnloadAdapterBody

log = logging.getLogger("tunesmith.serve")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ServeSettings(BaseModel):
    """Everything `tunesmith serve` takes; the CLI's options are these fields."""

    model: str = Field(DEFAULT_MODEL, description="the base: built-in name, HF folder, hub id or .gguf")
    adapters: dict[str, str] = Field(default_factory=dict, description="extra adapters to serve: name -> folder")
    registry: bool = Field(True, description="serve every registry adapter trained on this base")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="Bearer key every /v1 request must send")
    admin_key: str | None = Field(None, description="Bearer key for load/unload; without one they are disabled")
    device: str = "auto"
    max_loaded_adapters: int = Field(16, ge=1)
    max_batch_rows: int = Field(32, ge=1)
    max_queue: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_tokens_cap: int = Field(1024, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    max_n: int = Field(8, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)

    def check_exposure(self) -> None:
        if self.host not in LOOPBACK and not self.api_key:
            raise TunesmithError(f"--host {self.host}: binding beyond this machine needs an API key; "
                                 "set --api-key or TUNESMITH_API_KEY")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Served:
    """The loaded server state: model pool, tokenizer, scheduler, settings."""

    settings: ServeSettings
    pool: Any
    tokenizer: Any
    scheduler: Any
    context_length: int
    skipped: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def base_id(self) -> str:
        return self.settings.model


def load_served(settings: ServeSettings) -> Served:
    """Load the base, make the adapters servable (registry + given), start nothing yet."""
    from tunesmith.adapters import list_adapters, registry_dir
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model, load_tokenizer, pick_runtime, resolve_base
    from tunesmith.serve.pool import AdapterError, AdapterPool
    from tunesmith.serve.scheduler import Scheduler

    config = ModelConfig(path=settings.model, device=settings.device)
    folder = resolve_base(config)
    model = load_model(folder, config, pick_runtime(config))
    model.eval()
    tokenizer = load_tokenizer(folder)
    pool = AdapterPool(model, settings.model, folder, settings.max_loaded_adapters)
    skipped = []
    named = {e.name: registry_dir() / e.name for e in list_adapters()} if settings.registry else {}
    for name, path in {**named, **settings.adapters}.items():
        try:
            pool.register(name, path)
        except AdapterError as e:
            if name in settings.adapters:
                raise TunesmithError(f"--adapter {name}={path}: {e}") from None
            skipped.append(f"{name}: {e}")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    scheduler = Scheduler(pool, tokenizer, max_rows=settings.max_batch_rows, max_queue=settings.max_queue)
    return Served(settings, pool, tokenizer, scheduler, context, skipped)


# --- the app -----------------------------------------------------------------------------------

def create_app(served: Served):
    settings = served.settings

    @asynccontextmanager
    async def lifespan(app):
        served.scheduler.start()
        yield
        await asyncio.to_thread(served.scheduler.stop)

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, error: HTTPException):
        message = "no such route; see /v1/models" if error.status_code == 404 else str(error.detail)
        return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, error: RequestValidationError):
        return JSONResponse(ApiError(422, str(error)).body(), status_code=422)

    @app.exception_handler(BodyLimit.TooLarge)
    async def _too_large(request, error):
        return JSONResponse(BodyLimit.refusal(settings.max_body_bytes), status_code=413)

    @app.exception_handler(Exception)
    async def _internal(request, error: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(ApiError(500, "internal server error", kind="server_error").body(), status_code=500)

    def authorize(request: HttpRequest, admin: bool = False) -> None:
        key = settings.admin_key if admin else settings.api_key
        if admin and not key:
            raise ApiError(403, "adapter loading is disabled; start the server with --admin-key "
                                "(or TUNESMITH_ADMIN_KEY) to enable it", "admin_disabled", kind="permission_error")
        if not key:
            return
        sent = request.headers.get("authorization", "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            what = "admin key" if admin else "API key"
            raise ApiError(401, f"missing or wrong {what}: send the header 'Authorization: Bearer KEY'",
                           "invalid_api_key", kind="authentication_error")

    async def parse(request: HttpRequest, schema: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            message = first["msg"].removeprefix("Value error, ")
            more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
            raise ApiError(422, f"{param + ': ' if param else ''}{message}{more}", "invalid_value", param) from None

    def adapter_for(model: str) -> str | None:
        if model == served.base_id:
            return None
        if model in served.pool.servable:
            return model
        raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists the base and its adapters",
                       "model_not_found", "model")

    def rows(body, prompts: list[list[int]], adapter: str | None) -> list[Request]:
        if body.n > settings.max_n:
            raise ApiError(400, f"n: at most {settings.max_n} choices per request", "invalid_value", "n")
        budget = body.budget or min(settings.default_max_tokens, settings.max_tokens_cap)
        if budget > settings.max_tokens_cap:
            raise ApiError(400, f"max_tokens: {budget} is above this server's cap of {settings.max_tokens_cap}",
                           "invalid_value", "max_tokens")
        out = []
        for ids in prompts:
            if not ids:
                raise ApiError(400, "prompt: empty after tokenization", "invalid_value", "prompt")
            if len(ids) > settings.max_prompt_tokens:
                raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                                    f"{settings.max_prompt_tokens}", "context_length_exceeded")
            if len(ids) + budget > served.context_length:
                raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({budget}) exceed the model's "
                                    f"context of {served.context_length}", "context_length_exceeded")
            for j in range(body.n):
                seed = body.seed + j if body.seed is not None else None
                out.append(Request(ids, adapter, budget, body.temperature, body.top_p, body.stop, seed))
        return out

    async def run(rows_: list[Request], on_event=None) -> list[Completion]:
        """Queue the rows as one ticket; await every completion (calling `on_event` as text arrives)."""
        from tunesmith.serve.pool import AdapterError
        from tunesmith.serve.scheduler import QueueFull, Ticket

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        ticket = Ticket(rows_, lambda *event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            served.scheduler.submit(ticket)
        except QueueFull as e:
            raise ApiError(429, f"server is busy ({e}); retry shortly", "rate_limit_exceeded",
                           kind="rate_limit_error") from None
        done: dict[int, Completion] = {}
        try:
            while len(done) < len(rows_):
                index, text, completion, error = await events.get()
                if error is not None:
                    if isinstance(error, AdapterError):
                        code = "model_not_found" if error.status == 404 else None
                        raise ApiError(error.status, str(error), code, "model")
                    raise error
                if on_event is not None:
                    await on_event(index, text, completion)
                if completion is not None:
                    done[index] = completion
        finally:
            if len(done) < len(rows_):
                served.scheduler.cancel(ticket)
        return [done[i] for i in range(len(rows_))]

    def usage(completions: list[Completion], prompt_counts: list[int]) -> dict:
        generated = sum(len(c.token_ids) for c in completions)
        prompt = sum(prompt_counts)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def sse(data: dict | str) -> bytes:
        return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()

    def stream(produce) -> StreamingResponse:
        """Run `produce(put)` while streaming what it puts; errors after the start become an error event."""

        async def body() -> AsyncIterator[bytes]:
            chunks: asyncio.Queue = asyncio.Queue()
            task = asyncio.ensure_future(produce(chunks.put))
            task.add_done_callback(lambda _: chunks.put_nowait(None))
            try:
                while (chunk := await chunks.get()) is not None:
                    yield sse(chunk)
                error = task.exception()
                if error is not None:
                    api = error if isinstance(error, ApiError) else ApiError(500, "internal server error",
                                                                              kind="server_error")
                    if not isinstance(error, ApiError):
                        log.error("stream failed", exc_info=error)
                    yield sse(api.body())
                yield sse("[DONE]")
            finally:
                task.cancel()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        pool, scheduler = served.pool, served.scheduler
        return {"status": "ok", "base": served.base_id, "adapters_servable": len(pool.servable),
                "adapters_loaded": len(pool.loaded), "running_rows": len(scheduler.batch),
                "queued_requests": len(scheduler.queue)}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        entry = lambda name, parent: {"id": name, "object": "model", "created": served.created,  # noqa: E731
                                      "owned_by": "tunesmith", "root": served.base_id, "parent": parent}
        data = [entry(served.base_id, None)] + [entry(n, served.base_id) for n in sorted(served.pool.servable)]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        from tunesmith.generate import chat_prompt_ids

        authorize(request)
        body: ChatBody = await parse(request, ChatBody)
        adapter = adapter_for(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        try:
            ids = chat_prompt_ids(served.tokenizer, messages)
        except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
            raise ApiError(400, f"messages: the chat template rejects them: {e}", "invalid_value", "messages") from None
        todo = rows(body, [ids], adapter)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": choices, **extra}

        if body.stream:
            async def produce(put) -> None:
                for i in range(len(todo)):
                    await put(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}]))

                async def on_event(index, text, completion) -> None:
                    if text:
                        await put(chunk([{"index": index, "delta": {"content": text}, "logprobs": None,
                                          "finish_reason": None}]))
                    if completion is not None:
                        await put(chunk([{"index": index, "delta": {}, "logprobs": None,
                                          "finish_reason": completion.finish_reason}]))

                done = await run(todo, on_event)
                if body.include_usage:
                    await put(chunk([], usage=usage(done, [len(ids)])))

            return stream(produce)
        done = await run(todo)
        return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                             "finish_reason": c.finish_reason} for i, c in enumerate(done)],
                "usage": usage(done, [len(ids)])}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        authorize(request)
        body: CompletionBody = await parse(request, CompletionBody)
        adapter = adapter_for(body.model)
        vocab = len(served.tokenizer)
        prompts = []
        for p in body.prompts:
            if isinstance(p, str):
                prompts.append(served.tokenizer(p, add_special_tokens=False)["input_ids"])
            elif all(0 <= t < vocab for t in p):
                prompts.append(p)
            else:
                raise ApiError(400, f"prompt: token ids must lie in [0, {vocab})", "invalid_value", "prompt")
        todo = rows(body, prompts, adapter)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def envelope(choices: list[dict], **extra) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                    "choices": choices, **extra}

        if body.stream:
            async def produce(put) -> None:
                async def on_event(index, text, completion) -> None:
                    if text or completion is not None:
                        await put(envelope([{"index": index, "text": text, "logprobs": None,
                                             "finish_reason": completion.finish_reason if completion else None}]))

                done = await run(todo, on_event)
                if body.include_usage:
                    await put(envelope([], usage=usage(done, [len(p) for p in prompts for _ in range(body.n)])))

            return stream(produce)
        done = await run(todo)
        return envelope([{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                         for i, c in enumerate(done)],
                        usage=usage(done, [len(p) for p in prompts for _ in range(body.n)]))

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: HttpRequest):
        from tunesmith.adapters import get_adapter, registry_dir
        from tunesmith.serve.pool import AdapterError

        authorize(request, admin=True)
        body: LoadAdapterBody = await parse(request, LoadAdapterBody)
        if body.lora_name == served.base_id:
            raise ApiError(400, f"lora_name: {body.lora_name!r} is the base model's name", "invalid_value", "lora_name")
        try:
            path = Path(body.lora_path) if body.lora_path else registry_dir() / get_adapter(body.lora_name).name
        except TunesmithError as e:
            raise ApiError(404, str(e), "adapter_not_found", "lora_name") from None
        pool, scheduler = served.pool, served.scheduler

        def load() -> None:
            pool.register(body.lora_name, path)
            try:
                pool.ensure({body.lora_name}, scheduler.busy_adapters)
            except AdapterError:
                pool.unregister(body.lora_name, scheduler.busy_adapters)
                raise

        try:
            await asyncio.wrap_future(scheduler.call(load))
        except AdapterError as e:
            raise ApiError(e.status, str(e), None, "lora_path") from None
        return {"object": "lora_adapter", "id": body.lora_name, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: HttpRequest):
        from tunesmith.serve.pool import AdapterError

        authorize(request, admin=True)
        body: UnloadAdapterBody = await parse(request, UnloadAdapterBody)
        scheduler = served.scheduler
        try:
            await asyncio.wrap_future(scheduler.call(
                lambda: served.pool.unregister(body.lora_name, scheduler.busy_adapters)))
        except AdapterError as e:
            raise ApiError(e.status, str(e), "model_not_found", "lora_name") from None
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    return app


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before the app parses it (declared or streamed)."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyLimit.TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyLimit.TooLarge:
            if not started:
                await self._refuse(send)

    @staticmethod
    def refusal(limit: int) -> dict:
        return ApiError(413, f"request body is over this server's limit of {limit} bytes", "request_too_large").body()

    async def _refuse(self, send) -> None:
        body = json.dumps(self.refusal(self.limit)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def serve(settings: ServeSettings, on_ready=None) -> None:
    """Load everything, print a summary, and serve until interrupted."""
    import uvicorn

    settings.check_exposure()
    served = load_served(settings)
    app = create_app(served)
    if on_ready:
        on_ready(served)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5)
