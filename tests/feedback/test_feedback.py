"""The feedback page in a real browser (Debian's headless Chromium driven by Playwright), its SQLite store,
durability under SIGKILL, and the export to preference pairs."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tunesmith.feedback.export import export_pairs
from tunesmith.feedback.items import read_items
from tunesmith.feedback.store import Store

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2">'


def write_items(path: Path, n: int = 4) -> Path:
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "candidates": [f"It is {2 * i}.", f"Maybe {2 * i + 1}."]}
            for i in range(n)]
    rows[1]["candidates"][1] = HOSTILE
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class LivePage:
    def __init__(self, store: Store, token: str | None = None) -> None:
        import uvicorn

        from tunesmith.feedback.app import create_app

        self.server = uvicorn.Server(uvicorn.Config(create_app(store, token), host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make setup installs it)")
def test_rating_in_a_real_browser_by_click_and_keyboard_and_hostile_text_stays_text(tmp_path):
    from playwright.sync_api import sync_playwright

    store = Store(tmp_path / "feedback.sqlite")
    store.add_items(read_items(write_items(tmp_path / "items.jsonl"), None))
    page_server = LivePage(store)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                              "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(page_server.url + "/")
            page.fill("#reviewer", "ada")
            page.dispatch_event("#reviewer", "change")
            page.wait_for_selector("text=Question 0")
            page.select_option(".score >> nth=0", "4")
            page.fill("#comment", "clear and right")
            page.click("text=Best (1)")  # item 0: click
            page.wait_for_selector("text=Question 1")
            # item 1 holds the hostile candidate: shown literally, never run
            texts = page.locator(".candidate-text").all_inner_texts()
            assert HOSTILE in texts
            assert page.evaluate("window.pwned") is None
            assert page.locator(".candidate img").count() == 0 and page.locator(".candidate script").count() == 0
            page.locator("body").click()
            page.keyboard.press("2")  # item 1: keyboard pick
            page.wait_for_selector("text=Question 2")
            page.keyboard.press("t")  # item 2: tie
            page.wait_for_selector("text=Question 3")
            page.keyboard.press("s")  # item 3: skip
            page.wait_for_selector("text=All items rated")
            assert page.inner_text("#progress") == "4 / 4 rated"
            browser.close()
    finally:
        page_server.close()
    rows = sqlite3.connect(tmp_path / "feedback.sqlite").execute(
        "SELECT i.position, r.reviewer, r.verdict, r.best, r.scores, r.comment FROM ratings r JOIN items i "
        "ON i.id = r.item_id ORDER BY i.position").fetchall()
    assert rows == [(0, "ada", "best", 0, "[4, null]", "clear and right"), (1, "ada", "best", 1, None, None),
                    (2, "ada", "tie", None, None, None), (3, "ada", "skip", None, None, None)]
    assert sqlite3.connect(tmp_path / "feedback.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(db: Path, items: Path | None, port: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "tunesmith.cli", "feedback", "serve", "--db", str(db), "--port", str(port)]
    process = subprocess.Popen(args + (["--items", str(items)] if items else []), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return process
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "feedback server did not start"
            time.sleep(0.1)


def test_every_acknowledged_rating_survives_sigkill_exactly_once(tmp_path):
    clients, per_client = 8, 250
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"prompt": f"p{i}", "candidates": ["a", "b"]}) + "\n" for i in range(per_client)))
    db, port = tmp_path / "ratings.sqlite", free_port()
    item_ids = [i.id for i in (lambda s: (s.add_items(read_items(items, None)), s.items())[1])(Store(db))]
    acknowledged: list[str] = []
    lock = threading.Lock()
    process = start(db, None, port)

    def client(n: int) -> None:
        for i in range(per_client):
            body = json.dumps({"id": uuid.uuid4().hex, "item_id": item_ids[i], "reviewer": f"r{n}",
                               "verdict": "best", "best": (n + i) % 2}).encode()
            while True:  # resend the same rating (same id) until it is acknowledged
                request = urllib.request.Request(f"http://127.0.0.1:{port}/api/ratings", data=body,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=5) as response:
                        assert response.status == 200
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    time.sleep(0.05)
            with lock:
                acknowledged.append(json.loads(body)["id"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    [t.start() for t in threads]
    while len(acknowledged) < clients * per_client // 2:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # mid-run: no chance to flush or close anything
    process.wait()
    killed_at = len(acknowledged)
    process = start(db, None, port)
    try:
        [t.join(timeout=300) for t in threads]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert killed_at < clients * per_client and len(acknowledged) == clients * per_client
    stored = [row[0] for row in sqlite3.connect(db).execute("SELECT id FROM ratings")]
    assert len(stored) == len(set(stored)) == clients * per_client
    assert set(acknowledged) <= set(stored), "every acknowledged rating is there, once"


def test_export_pairs_with_agreement_and_the_tie_and_disagreement_policy(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    prompts = ["clear", "split", "tied", "low"]
    store.add_items([(p, p, [{"source": "m1", "text": f"{p} A"}, {"source": "m2", "text": f"{p} B"},
                             {"source": "m3", "text": f"{p} C"}]) for p in prompts])
    votes = {"clear": ["best:0", "best:0", "best:1"], "split": ["best:0", "best:1"], "tied": ["tie", "tie", "best:2"],
             "low": ["best:0", "best:1", "best:2", "best:0", "tie", "best:1", "skip"]}
    for item, cast in votes.items():
        for n, vote in enumerate(cast):
            verdict, _, best = vote.partition(":")
            store.add_rating(uuid.uuid4().hex, item, f"rev{n}", verdict, int(best) if best else None, None, None)
    store.add_rating(uuid.uuid4().hex, "split", "rev0", "best", 1, None, None)  # rev0 changes their mind: 1 wins
    pairs, stats = export_pairs(store, min_agreement=0.5)
    by_item = {}
    for p in pairs:
        by_item.setdefault(p["item_id"], []).append(p)
    assert sorted(by_item) == ["clear", "split"]
    assert [(p["chosen"], p["rejected"]) for p in by_item["clear"]] == [("clear A", "clear B"), ("clear A", "clear C")]
    assert by_item["clear"][0]["raters"] == 3 and by_item["clear"][0]["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert by_item["split"][0]["chosen"] == "split B" and by_item["split"][0]["agreement"] == 1.0
    assert stats["dropped"] == {"tie": 1, "no majority": 1}
    assert stats["rated_items"] == 4 and stats["pairs"] == 4


def test_a_token_is_required_off_loopback_and_checked(tmp_path):
    from tunesmith.errors import TunesmithError
    from tunesmith.feedback.app import check_exposure

    with pytest.raises(TunesmithError, match="token"):
        check_exposure("0.0.0.0", None)
    store = Store(tmp_path / "t.sqlite")
    store.add_items(read_items(write_items(tmp_path / "items.jsonl"), None))
    live = LivePage(store, token="sesame")
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(live.url + "/api/next?reviewer=x")
        assert refused.value.code == 401
        request = urllib.request.Request(live.url + "/api/next?reviewer=x", headers={"Authorization": "Bearer sesame"})
        assert json.loads(urllib.request.urlopen(request).read())["total"] == 4
        page = urllib.request.urlopen(live.url + "/")
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    finally:
        live.close()


def test_bad_ratings_are_refused_with_a_reason(tmp_path):
    store = Store(tmp_path / "b.sqlite")
    store.add_items(read_items(write_items(tmp_path / "items.jsonl"), None))
    live = LivePage(store)
    item = store.items()[0].id

    def post(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(live.url + "/api/ratings", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        good = {"id": "abcdef123456", "item_id": item, "reviewer": "r", "verdict": "best", "best": 1}
        assert post(good) == (200, {"stored": True, "done": 1, "total": 4})
        assert post(good)[1]["stored"] is False, "the same id again is stored once"
        assert post({**good, "id": "zzzzzzzz1", "best": 5})[0] == 400
        assert post({**good, "id": "zzzzzzzz2", "verdict": "meh"})[0] == 422
        assert post({**good, "id": "zzzzzzzz3", "item_id": "nope"})[0] == 400
        assert post({**good, "id": "zzzzzzzz4", "scores": [9, 1]})[0] == 400
    finally:
        live.close()


def test_generated_candidates_are_made_once_and_shared_and_the_example_runs(tmp_path, tiny_path):
    from tunesmith.adapters import load_trained
    from tunesmith.feedback.app import Candidates

    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh_rlhf_harmless" / "test.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    if shared.is_file():  # the example's own first step, on the real data
        script = Path(__file__).resolve().parents[2] / "examples" / "feedback_hh" / "make_prompts.py"
        subprocess.run([sys.executable, str(script), str(shared), str(prompts), "--n", "3"], check=True)
    else:
        prompts.write_text('{"prompt": "How do I stay safe online?"}\n{"prompt": "Tell me a joke."}\n')
    store = Store(tmp_path / "gen.sqlite")
    store.add_items(read_items(None, prompts))
    model, tokenizer = load_trained(str(tiny_path))
    candidates = Candidates(store, [("tiny-a", model, tokenizer), ("tiny-b", model, tokenizer)], max_new_tokens=6)
    live = LivePage.__new__(LivePage)
    import uvicorn

    from tunesmith.feedback.app import create_app

    live.server = uvicorn.Server(uvicorn.Config(create_app(store, None, candidates), host="127.0.0.1", port=0,
                                                log_level="warning"))
    live.thread = threading.Thread(target=live.server.run, daemon=True)
    live.thread.start()
    while not live.server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{live.server.servers[0].sockets[0].getsockname()[1]}"
    try:
        seen = [json.loads(urllib.request.urlopen(f"{url}/api/next?reviewer={who}").read())["item"]
                for who in ("ann", "bob")]
    finally:
        live.close()
    assert seen[0] == seen[1] and len(seen[0]["candidates"]) == 2
    assert store.item(seen[0]["id"]).candidates[1]["source"] == "tiny-b", "cached in the store"
