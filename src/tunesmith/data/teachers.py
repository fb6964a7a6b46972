"""Teachers for synthetic data: a local model, or any OpenAI-compatible chat endpoint.

`complete(chats)` answers a batch of chats and returns, per chat, the text or the error that stopped
it. The endpoint teacher runs at most `concurrency` requests at once, each with a timeout, and
retries timeouts, connection errors, 429 and 5xx with exponential backoff (honouring Retry-After);
other 4xx are the caller's mistake and are not retried.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tunesmith.errors import TunesmithError

Chat = list[dict[str, str]]


class TeacherError(Exception):
    """A chat the teacher could not answer; the message says why (and after how many tries)."""


class EndpointTeacher:
    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, max_tokens: int = 512,
                 temperature: float = 0.7) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise TunesmithError(f"--base-url {base_url}: give an http(s) URL such as http://127.0.0.1:8000/v1")
        self.key = None
        if api_key_env:
            self.key = os.environ.get(api_key_env)
            if not self.key:
                raise TunesmithError(f"--api-key-env {api_key_env}: that environment variable is not set")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.concurrency, self.timeout = model, concurrency, timeout
        self.retries, self.backoff, self.max_tokens, self.temperature = retries, backoff, max_tokens, temperature
        self.name = f"{model} @ {base_url}"
        self.attempts = 0

    def complete(self, chats: list[Chat], seeds: list[int] | None = None) -> list[str | TeacherError]:
        seeds = seeds or [None] * len(chats)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, chats, seeds))

    def _one(self, chat: Chat, seed: int | None) -> str | TeacherError:
        body = {"model": self.model, "messages": chat, "max_tokens": self.max_tokens, "temperature": self.temperature}
        if seed is not None:
            body["seed"] = seed
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        problem = ""
        for attempt in range(self.retries + 1):
            self.attempts += 1
            wait = self.backoff * 2**attempt * (0.5 + random.random() / 2)
            request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read())
                return answer["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                detail = _error_message(e)
                problem = f"HTTP {e.code}: {detail}"
                if e.code != 429 and e.code < 500:
                    return TeacherError(f"{self.url}: {problem} (not retried)")
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                problem = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else str(reason)
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                problem = "the reply is not an OpenAI chat completion"
            if attempt < self.retries:
                time.sleep(wait)
        return TeacherError(f"{self.url}: {problem} after {self.retries + 1} tries")


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
        return str(body.get("error", {}).get("message") or body)[:200]
    except (json.JSONDecodeError, AttributeError, OSError):
        return error.reason or "error"


class LocalTeacher:
    """A model tunesmith can load (built-in, HF folder, GGUF, run folder), generating in batches."""

    def __init__(self, spec: str, batch_size: int = 8, max_tokens: int = 512, temperature: float = 0.7) -> None:
        from tunesmith.adapters import load_trained

        self.model, self.tokenizer = load_trained(spec)
        self.model.eval()
        self.batch_size, self.max_tokens, self.temperature = batch_size, max_tokens, temperature
        self.name = str(spec)
        self.concurrency = batch_size

    def complete(self, chats: list[Chat], seeds: list[int] | None = None) -> list[str | TeacherError]:
        from tunesmith.generate import chat_prompt_ids
        from tunesmith.serve.engine import Request, generate

        seeds = seeds or [None] * len(chats)
        out: list[str | TeacherError] = []
        for start in range(0, len(chats), self.batch_size):
            requests = [Request(chat_prompt_ids(self.tokenizer, chat), max_tokens=self.max_tokens,
                                temperature=self.temperature, seed=seed)
                        for chat, seed in zip(chats[start : start + self.batch_size], seeds[start : start + self.batch_size])]
            out += [c.text.strip() for c in generate(self.model, self.tokenizer, requests)]
        return out
