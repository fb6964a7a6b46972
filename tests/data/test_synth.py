"""`tunesmith synth` against real local HTTP servers speaking the OpenAI chat API: a scripted one (answers,
failures, slowness) and tunesmith's own server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run_cli

from tunesmith.data.synth import Filters, Journal, answer_prompts, expand_instructions
from tunesmith.data.teachers import EndpointTeacher


class Scripted:
    """An OpenAI-style chat endpoint whose answers are scripted by the prompt text."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.calls, self.lock = answers, {}, threading.Lock()
        script = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with script.lock:
                    script.calls[prompt] = script.calls.get(prompt, 0) + 1
                    calls = script.calls[prompt]
                if prompt.startswith("FAIL"):
                    return self.reply(500, {"error": {"message": "teacher exploded"}})
                if prompt.startswith("FLAKY") and calls <= 2:
                    return self.reply(503, {"error": {"message": "busy"}})
                if prompt.startswith("SLOW"):
                    time.sleep(1.0)
                if prompt.startswith("BAD"):
                    return self.reply(400, {"error": {"message": "bad request"}})
                answer = script.answers.get(prompt, f"Answer to: {prompt}")
                if prompt.startswith("Here are examples"):
                    answer = f"Describe animal number {calls}{sum(script.calls.values())} and its habitat."
                self.reply(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def endpoint():
    server = Scripted({"What is a cat?": "A cat is a small domesticated feline.",
                       "What's a cat?": "A cat is a small domesticated feline!",
                       "Refuse please": "I'm sorry, but I cannot help with that.",
                       "Short one": "ok"})
    yield server
    server.close()


def teacher(endpoint, **kw) -> EndpointTeacher:
    return EndpointTeacher(endpoint.url, "scripted", concurrency=4, timeout=kw.pop("timeout", 5), backoff=0.01, **kw)


def test_rows_are_sft_ready_with_provenance_and_a_rerun_adds_nothing(endpoint, tmp_path, encoder):
    output = tmp_path / "synth.jsonl"
    prompts = ["Explain photosynthesis.", "How do volcanoes erupt?", "Write a haiku about rain.",
               "What is the capital of Peru?", "Name three prime numbers.", "Why is the sky blue?"]
    first = answer_prompts(teacher(endpoint), prompts[:4], output, encoder=encoder)
    assert first.kept == 4
    again = answer_prompts(teacher(endpoint), prompts, output, encoder=encoder)
    assert (again.kept, again.already_done) == (2, 4)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == prompts and len({r["id"] for r in rows}) == 6
    assert all(endpoint.calls[p] == 1 for p in prompts), "nothing was asked twice"
    assert rows[0]["provenance"]["teacher"] == f"scripted @ {endpoint.url}" and rows[0]["provenance"]["time"]
    from tunesmith.data.formats import load_examples

    loaded = load_examples([str(output)], "auto")
    assert (loaded.format, len(loaded.examples)) == ("alpaca", 6), "stage: sft reads the output as it is"


def test_a_torn_last_line_from_a_killed_run_is_dropped_and_redone(endpoint, tmp_path):
    output = tmp_path / "synth.jsonl"
    answer_prompts(teacher(endpoint), ["A", "B"], output, filters=Filters(near_duplicate=1.0))
    output.write_bytes(output.read_bytes()[:-10])  # the second row half-written
    assert len(Journal(output).rows) == 1
    report = answer_prompts(teacher(endpoint), ["A", "B"], output, filters=Filters(near_duplicate=1.0))
    assert (report.kept, report.already_done) == (1, 1)
    assert [json.loads(line)["instruction"] for line in output.read_text().splitlines()] == ["A", "B"]


def test_duplicates_near_duplicates_refusals_lengths_and_contamination_are_dropped(endpoint, tmp_path, encoder):
    output = tmp_path / "synth.jsonl"
    prompts = ["What is a cat?", "What's a cat?", "Refuse please", "Short one", "Tell me about the moon landing",
               "What is a cat?"]
    report = answer_prompts(teacher(endpoint), prompts, output, Filters(min_chars=5), encoder,
                            eval_prompts=["Tell me about the Moon landing."])
    kept = [json.loads(line)["instruction"] for line in output.read_text().splitlines()]
    assert kept == ["What is a cat?"]
    assert report.rejected == {"near-duplicate": 1, "refusal": 1, "too short": 1, "contaminated": 1}
    reasons = {json.loads(line)["instruction"]: json.loads(line)["reason"]
               for line in (tmp_path / "synth.rejected.jsonl").read_text().splitlines()}
    assert reasons["What's a cat?"] == "near-duplicate"


def test_endpoint_errors_are_retried_then_reported(endpoint, tmp_path):
    output = tmp_path / "synth.jsonl"
    report = answer_prompts(teacher(endpoint, retries=3), ["FLAKY one", "FAIL two", "BAD three", "fine"], output,
                            filters=Filters(near_duplicate=1.0))
    assert report.kept == 2, "the flaky prompt succeeded on its third try"
    assert endpoint.calls["FLAKY one"] == 3 and endpoint.calls["FAIL two"] == 4 and endpoint.calls["BAD three"] == 1
    assert any("HTTP 500: teacher exploded after 4 tries" in e for e in report.errors)
    assert any("HTTP 400: bad request (not retried)" in e for e in report.errors)
    rerun = answer_prompts(teacher(endpoint, retries=0), ["FAIL two"], output, filters=Filters(near_duplicate=1.0))
    assert rerun.errors and endpoint.calls["FAIL two"] == 5, "failed prompts are not journalled: a rerun retries them"


def test_a_slow_endpoint_times_out_and_says_so(endpoint, tmp_path):
    report = answer_prompts(teacher(endpoint, timeout=0.3, retries=1), ["SLOW answer"], tmp_path / "s.jsonl",
                            filters=Filters(near_duplicate=1.0))
    assert report.kept == 0 and "timed out after 2 tries" in report.errors[0]


def test_expand_writes_new_distinct_instructions_and_resumes(endpoint, tmp_path, encoder):
    seeds = ["Describe the habitat of the red fox.", "Explain how bees make honey.", "List three facts about owls."]
    journal = tmp_path / "new.instructions.jsonl"
    first = expand_instructions(teacher(endpoint), seeds, 3, journal, encoder)
    assert len(first) == 3 and len(set(first)) == 3 and not set(first) & set(seeds)
    more = expand_instructions(teacher(endpoint), seeds, 5, journal, encoder)
    assert more[:3] == first and len(more) == 5
    assert len(journal.read_text().splitlines()) == 5


def test_the_synth_command_with_tunesmith_serve_as_the_teacher(tmp_path, capsys, tiny_path, adapter_dirs):
    from serve.live import start_server

    server = start_server(tiny_path, adapter_dirs, max_tokens_cap=64)
    try:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("Name a colour.\nName a fruit.\nName a tree.\n")
        output = tmp_path / "out.jsonl"
        args = ["synth", "--prompts", str(prompts), "--output", str(output), "--base-url", server.url + "/v1",
                "--model", "cats", "--max-tokens", "12", "--near-duplicate", "1.0"]
        code, out, err = run_cli(*args, capsys=capsys)
        assert code == 0, err
        assert "3 rows added (0 already done)" in out
        code, out, _ = run_cli(*args, capsys=capsys)
        assert "0 rows added (3 already done)" in out
    finally:
        server.close()
    code, _, err = run_cli("synth", "--prompts", str(prompts), "--output", str(tmp_path / "x.jsonl"), "--base-url",
                           "http://127.0.0.1:9/v1", "--model", "m", "--retries", "0", "--near-duplicate", "1.0",
                           capsys=capsys)
    assert code == 2 and "the teacher answered nothing" in err and "3 failed requests" in err


def test_a_local_teacher_answers_in_batches_reproducibly(tmp_path, tiny_path):
    from tunesmith.data.teachers import LocalTeacher

    teacher = LocalTeacher(str(tiny_path), batch_size=2, max_tokens=6, temperature=0.8)
    prompts = ["Name a colour.", "Name a fruit.", "Name a tree."]
    outputs = []
    for name in ("a.jsonl", "b.jsonl"):
        report = answer_prompts(teacher, prompts, tmp_path / name, filters=Filters(near_duplicate=1.0))
        assert report.kept == 3 and not report.errors
        outputs.append([json.loads(line)["output"] for line in (tmp_path / name).read_text().splitlines()])
    assert outputs[0] == outputs[1], "each prompt's sampling seed comes from its id"
    assert json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])["provenance"]["teacher"] == str(tiny_path)
