"""`tunesmith serve` as a user runs it: a real process, its start-up line, one request, a clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from serve.test_app import post

EXE = [sys.executable, "-m", "tunesmith.cli", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command_answers_and_stops_cleanly(tiny_path, adapter_dirs, tmp_path):
    port = free_port()
    env = {**os.environ, "TUNESMITH_API_KEY": "k"}
    process = subprocess.Popen([*EXE, "--model", str(tiny_path), "--no-registry", "--port", str(port),
                                "--adapter", f"cats={adapter_dirs['cats']}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    health = json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert health["adapters_servable"] == 1
        code, body = post(url, {"model": "cats", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, "k")
        assert code == 200 and body["model"] == "cats"
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert "serving" in out and "1 adapter(s): cats" in out and "API key: required" in out
    assert "Traceback" not in err


def test_unsafe_or_wrong_options_are_one_line_errors(tiny_path, tmp_path):
    cases = [(["--host", "0.0.0.0"], "needs an API key"),
             (["--adapter", "nameonly"], "NAME=FOLDER"),
             (["--adapter", f"x={tmp_path}"], "adapter_config.json")]
    env = {k: v for k, v in os.environ.items() if k != "TUNESMITH_API_KEY"}
    for args, needle in cases:
        result = subprocess.run([*EXE, "--model", str(tiny_path), "--no-registry", *args], capture_output=True,
                                text=True, env=env, timeout=120)
        assert result.returncode == 2 and needle in result.stderr, (args, result.stderr)
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
