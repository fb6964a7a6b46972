"""One thread owns the model: it admits queued requests into the running batch between steps.

Requests that arrive together are prefilled together (dynamic batching), and new requests join
a batch that is already decoding (continuous batching), up to `max_rows` rows and as many
distinct adapters as the pool may hold. Adapter loads and unloads run on the same thread, between
steps, so nothing changes under a forward pass. Callers talk to it through thread-safe methods.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from tunesmith.serve.engine import Batch, Completion, Request
from tunesmith.serve.pool import AdapterError, AdapterPool


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Ticket:
    """One API request: `n` rows that share a prompt; `sink(index, text, completion, error)` gets every event."""

    requests: list[Request]
    sink: Callable[[int, str, Completion | None, Exception | None], None]
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def adapters(self) -> set[str]:
        return {r.adapter for r in self.requests if r.adapter}


class Scheduler:
    def __init__(self, pool: AdapterPool, tokenizer, max_rows: int = 32, max_queue: int = 256,
                 gather_s: float = 0.005) -> None:
        self.pool, self.tokenizer = pool, tokenizer
        self.max_rows, self.max_queue, self.gather_s = max_rows, max_queue, gather_s
        self.queue: deque[Ticket] = deque()
        self.admin: deque[tuple[Callable[[], Any], Future]] = deque()
        self.wake = threading.Condition()
        self.batch = Batch(pool.model, tokenizer)
        self.thread = threading.Thread(target=self._run, name="tunesmith-scheduler", daemon=True)
        self.stopping = False
        self.steps = self.prefills = 0

    # --- called from any thread ---------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    def submit(self, ticket: Ticket) -> None:
        with self.wake:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are already waiting")
            self.queue.append(ticket)
            self.wake.notify()

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancelled = True  # read by the scheduler thread; a bool store is atomic

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the scheduler thread between steps (adapter loads and unloads)."""
        future: Future = Future()
        with self.wake:
            self.admin.append((fn, future))
            self.wake.notify()
        return future

    @property
    def busy_adapters(self) -> set[str]:
        return self.batch.adapters_in_use

    # --- the scheduler thread -----------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.wake:
                while not (self.stopping or self.queue or self.admin or self.batch.rows):
                    self.wake.wait()
                if self.stopping:
                    break
                idle = not self.batch.rows
            if idle and self.queue and self.gather_s:
                time.sleep(self.gather_s)  # let requests that arrive together be prefilled together
            self._admin()
            self._admit()
            if self.batch.rows:
                self._step()
        self._fail_all(RuntimeError("server is shutting down"))

    def _admin(self) -> None:
        while True:
            with self.wake:
                if not self.admin:
                    return
                fn, future = self.admin.popleft()
            try:
                future.set_result(fn())
            except Exception as e:  # handed to the caller
                future.set_exception(e)

    def _admit(self) -> None:
        taken: list[Ticket] = []
        rows, adapters = len(self.batch), set(self.batch.adapters_in_use)
        with self.wake:
            while self.queue:
                ticket = self.queue[0]
                if ticket.cancelled:
                    self.queue.popleft()
                    continue
                wanted = adapters | ticket.adapters
                if rows + len(ticket.requests) > self.max_rows and rows:
                    break
                if len(wanted) > self.pool.max_loaded and adapters:
                    break  # waits until running rows free an adapter slot
                self.queue.popleft()
                taken.append(ticket)
                rows, adapters = rows + len(ticket.requests), wanted
        if not taken:
            return
        busy = self.batch.adapters_in_use
        ready = []
        for ticket in taken:
            try:
                self.pool.ensure(ticket.adapters, busy | {a for t in ready for a in t.adapters})
            except AdapterError as e:
                for i in range(len(ticket.requests)):
                    ticket.sink(i, "", None, e)
                continue
            ready.append(ticket)
        if not ready:
            return
        self.batch.model = self.pool.model
        requests = [r for t in ready for r in t.requests]
        keys = [(t, i) for t in ready for i in range(len(t.requests))]
        try:
            self.batch.add(requests, keys)
            self.prefills += 1
        except Exception as e:  # a failed prefill fails its own requests, not the running ones
            for ticket, i in keys:
                ticket.sink(i, "", None, e)

    def _step(self) -> None:
        for row in self.batch.rows:
            ticket, _ = row.key
            if ticket.cancelled:
                row.cancelled = True
        self.batch.model = self.pool.model
        try:
            events = self.batch.step()
        except Exception as e:
            self._fail_all(e)
            return
        self.steps += 1
        for event in events:
            ticket, index = event.key
            if not ticket.cancelled:
                ticket.sink(index, event.text, event.done, None)
        self.pool.collect(self.batch.adapters_in_use)

    def _fail_all(self, error: Exception) -> None:
        for row in self.batch.rows:
            ticket, index = row.key
            ticket.sink(index, "", None, error)
        self.batch = Batch(self.pool.model, self.tokenizer)
        with self.wake:
            waiting, self.queue = list(self.queue), deque()
        for ticket in waiting:
            for i in range(len(ticket.requests)):
                ticket.sink(i, "", None, error)
