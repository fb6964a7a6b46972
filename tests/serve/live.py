"""`tunesmith serve` in a background thread: real uvicorn on a free port, for the serving tests."""

from __future__ import annotations

import threading
import time


class LiveServer:
    """`tunesmith serve` in a background thread on a free port: real uvicorn, real sockets."""

    def __init__(self, settings) -> None:
        import uvicorn

        from tunesmith.serve.app import create_app, load_served

        self.served = load_served(settings)
        config = uvicorn.Config(create_app(self.served), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(tiny_path, adapter_dirs, **settings) -> LiveServer:
    from tunesmith.serve.app import ServeSettings

    defaults = dict(model=str(tiny_path), adapters={n: str(p) for n, p in adapter_dirs.items()}, registry=False,
                    admin_key="admin-secret", max_tokens_cap=64, max_prompt_tokens=256, max_body_bytes=64 * 1024)
    return LiveServer(ServeSettings(**{**defaults, **settings}))
