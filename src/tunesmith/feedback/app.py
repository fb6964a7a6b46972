"""`tunesmith feedback serve`: the rating page and its JSON API.

GET /            the page (static HTML + JS; model output is set with textContent, never as HTML, and a
                 Content-Security-Policy forbids inline scripts)
GET /api/next    the reviewer's next unrated item and their progress
POST /api/ratings  {id, item_id, reviewer, verdict: best|tie|skip, best, scores, comment}; 200 only after
                 the row is committed to SQLite (WAL, synchronous=FULL); the same id twice is stored once
Binds 127.0.0.1 by default; elsewhere a token is required (Bearer header, or ?token= on the page URL).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi import Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError

from tunesmith.errors import TunesmithError
from tunesmith.feedback.store import Store

STATIC = Path(__file__).parent / "static"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                               "img-src 'self'; object-src 'none'; base-uri 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class RatingBody(BaseModel):
    id: str = Field(..., min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    item_id: str = Field(..., min_length=1, max_length=128)
    reviewer: str = Field(..., min_length=1, max_length=80)
    verdict: Literal["best", "tie", "skip"]
    best: int | None = None
    scores: list[int | None] | None = None
    comment: str | None = Field(None, max_length=4000)


def item_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


class Candidates:
    """Candidates made on the fly by configured generators, once per item (cached in the store)."""

    def __init__(self, store: Store, generators: list[tuple[str, object, object]], max_new_tokens: int = 256) -> None:
        self.store, self.generators, self.max_new_tokens = store, generators, max_new_tokens
        self.lock = threading.Lock()

    def ensure(self, item) -> None:
        if item.candidates is not None or not self.generators:
            return
        from tunesmith.generate import generate_reply

        with self.lock:
            fresh = self.store.item(item.id)
            if fresh.candidates is not None:
                item.candidates = fresh.candidates
                return
            made = [{"source": name, "text": generate_reply(model, tokenizer, [{"role": "user", "content": item.prompt}],
                                                            self.max_new_tokens)}
                    for name, model, tokenizer in self.generators]
            self.store.set_candidates(item.id, made)
            item.candidates = made


def create_app(store: Store, token: str | None = None, candidates: Candidates | None = None) -> FastAPI:
    app = FastAPI(title="tunesmith feedback", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def headers(request, call_next):
        if token and request.url.path.startswith("/api/"):
            sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(sent.encode(), token.encode()):
                return JSONResponse({"error": "missing or wrong token"}, status_code=401, headers=SECURITY_HEADERS)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(HTTPException)
    async def _http(request, error: HTTPException):
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in ("app.js", "style.css"):
            raise HTTPException(404, "not found")
        return FileResponse(STATIC / name)

    @app.get("/api/next")
    async def next_item(reviewer: str):
        if not reviewer.strip():
            raise HTTPException(400, "reviewer: give your name")
        item = store.next_item(reviewer)
        if item is not None and candidates is not None:
            await asyncio.to_thread(candidates.ensure, item)
        done, total = store.progress(reviewer)
        if item is None:
            return {"item": None, "done": done, "total": total}
        return {"item": {"id": item.id, "prompt": item.prompt,
                         "candidates": [c["text"] for c in item.candidates or []]}, "done": done, "total": total}

    @app.post("/api/ratings")
    async def rate(request: HttpRequest):
        try:
            body = RatingBody.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            raise HTTPException(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        try:
            stored = await asyncio.to_thread(store.add_rating, body.id, body.item_id, body.reviewer.strip(),
                                             body.verdict, body.best, body.scores, body.comment)
        except TunesmithError as e:
            raise HTTPException(400, str(e)) from None
        done, total = store.progress(body.reviewer.strip())
        return {"stored": stored, "done": done, "total": total}

    return app


def check_exposure(host: str, token: str | None) -> None:
    if host not in LOOPBACK and not token:
        raise TunesmithError(f"--host {host}: reviewers elsewhere need a token; set --token or TUNESMITH_FEEDBACK_TOKEN")
