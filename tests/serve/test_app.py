"""The HTTP server, end to end over real sockets: the official openai client, adapters per request,
hot load/unload, auth, limits, and OpenAI-shaped 4xx errors for every kind of bad request."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from conftest import run_cli
from serve.live import start_server

MESSAGES = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture(scope="module")
def live(tiny_path, adapter_dirs):
    server = start_server(tiny_path, adapter_dirs)
    yield server
    server.close()


def post(url: str, body: bytes | dict, key: str | None = None, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def client(live, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat(live, model: str, content: str = "Tell me something.", max_tokens: int = 12, **extra) -> str:
    reply = client(live).chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                 max_tokens=max_tokens, temperature=0, **extra)
    return reply.choices[0].message.content


def test_the_openai_client_lists_models_chats_and_streams(live, tiny_path):
    api = client(live)
    ids = [m.id for m in api.models.list().data]
    assert ids[0] == str(tiny_path) and sorted(ids[1:]) == sorted(live.served.pool.servable)
    reply = api.chat.completions.create(model="dogs", messages=MESSAGES, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
    pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model="dogs", messages=MESSAGES, max_tokens=12, temperature=0, stream=True) if c.choices]
    assert len([p for p in pieces if p]) > 1, "text arrives in several events"
    assert "".join(pieces) == reply.choices[0].message.content


def test_completions_with_n_seed_and_stop(live):
    api = client(live)
    greedy = api.completions.create(model="cats", prompt="Once upon a time", max_tokens=10, temperature=0)
    text = greedy.choices[0].text
    assert greedy.object == "text_completion" and len(text) > 0
    sampled = [api.completions.create(model="cats", prompt="Once upon a time", max_tokens=10, temperature=1.0,
                                      seed=5, n=3) for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices], "a seed reproduces"
    assert len({c.text for c in sampled[0].choices}) > 1, "n choices draw differently"
    stop = text[3:6]
    cut = api.completions.create(model="cats", prompt="Once upon a time", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="cats", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == text


@pytest.mark.parametrize("name", ["cats", "owls"])
def test_greedy_output_for_an_adapter_equals_the_chat_command(live, adapter_dirs, name, capsys):
    code, out, _ = run_cli("chat", "--model", str(adapter_dirs[name]), "--prompt", "Tell me something.",
                           "--max-new-tokens", "16", capsys=capsys)
    assert code == 0 and out.strip()
    assert chat(live, name, max_tokens=16).strip() == out.strip()


def test_concurrent_requests_for_three_adapters_and_the_base_equal_each_alone(live, tiny_path):
    models = ["cats", "dogs", "birds", str(tiny_path)] * 2
    prompts = [f"Question number {i}: {'why ' * i}?" for i in range(len(models))]
    alone = [chat(live, m, p) for m, p in zip(models, prompts)]
    together: list[str | None] = [None] * len(models)
    barrier = threading.Barrier(len(models))

    def ask(i: int) -> None:
        barrier.wait()
        together[i] = chat(live, models[i], prompts[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(models))]
    prefills = live.served.scheduler.prefills
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert together == alone
    assert live.served.scheduler.prefills - prefills < len(models), "requests that arrived together were batched"
    assert len(set(alone[:4])) == 4


def test_hot_load_use_unload_then_404(live, adapter_dirs):
    admin = "admin-secret"
    code, body = post(live.url, {"lora_name": "newcomer", "lora_path": str(adapter_dirs["crabs"])}, admin,
                      "/v1/load_lora_adapter")
    assert (code, body["status"]) == (200, "loaded")
    assert "newcomer" in [m.id for m in client(live).models.list().data]
    assert chat(live, "newcomer") == chat(live, "crabs")
    code, body = post(live.url, {"lora_name": "newcomer"}, admin, "/v1/unload_lora_adapter")
    assert (code, body["status"]) == (200, "unloaded")
    code, body = post(live.url, {"model": "newcomer", "messages": MESSAGES})
    assert code == 404 and body["error"]["code"] == "model_not_found"
    assert post(live.url, {"lora_name": "newcomer"}, admin, "/v1/unload_lora_adapter")[0] == 404
    # admin routes want the admin key
    assert post(live.url, {"lora_name": "x", "lora_path": str(adapter_dirs["crabs"])}, None,
                "/v1/load_lora_adapter")[0] == 401
    assert post(live.url, {"lora_name": "x", "lora_path": str(adapter_dirs["crabs"])}, "wrong",
                "/v1/load_lora_adapter")[0] == 401


def test_adapters_of_another_base_or_bad_folders_are_refused(live, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/some/other/base",
                                                              "r": 4, "target_modules": ["q_proj"]}))
    code, body = post(live.url, {"lora_name": "foreign", "lora_path": str(foreign)}, "admin-secret",
                      "/v1/load_lora_adapter")
    assert code == 400 and "/some/other/base" in body["error"]["message"]
    code, _ = post(live.url, {"lora_name": "nowhere", "lora_path": str(tmp_path / "missing")}, "admin-secret",
                   "/v1/load_lora_adapter")
    assert code == 404
    code, body = post(live.url, {"lora_name": "../escape", "lora_path": str(foreign)}, "admin-secret",
                      "/v1/load_lora_adapter")
    assert code == 400 and "adapter name" in body["error"]["message"]


@pytest.mark.parametrize("body, code, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "no-such-model", "messages": MESSAGES}, 404, "does not exist"),
    ({"model": "cats", "messages": MESSAGES, "max_tokens": -1}, 422, "max_tokens"),
    ({"model": "cats", "messages": MESSAGES, "max_tokens": 65}, 400, "cap"),
    ({"model": "cats", "messages": MESSAGES, "temperature": "hot"}, 422, "temperature"),
    ({"model": "cats", "messages": []}, 422, "messages"),
    ({"model": "cats"}, 422, "messages"),
    ({"model": "cats", "messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    ({"model": "cats", "messages": MESSAGES, "n": 99}, 400, "n:"),
    ({"model": "cats", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"model": "cats", "messages": MESSAGES, "logprobs": True}, 422, "logprobs"),
    ({"model": "cats", "messages": [{"role": "user", "content": "word " * 400}]}, 400, "at most 256"),
    ({"model": "cats", "messages": [{"role": "user", "content": "x" * 70_000}]}, 413, "limit"),
])
def test_bad_requests_get_the_right_4xx_in_openai_shape(live, body, code, needle):
    got, answer = post(live.url, body)
    assert got == code, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and needle in answer["error"]["message"]


def test_bad_completion_prompts_and_unknown_routes(live):
    assert post(live.url, {"model": "cats", "prompt": [10**9]}, path="/v1/completions")[0] == 400
    assert post(live.url, {"model": "cats", "prompt": []}, path="/v1/completions")[0] == 422
    assert post(live.url, {"model": "cats", "prompt": "hi", "echo": True}, path="/v1/completions")[0] == 422
    code, body = post(live.url, {}, path="/v1/embeddings")
    assert code == 404 and "error" in body


def test_an_api_key_is_required_when_configured(tiny_path, adapter_dirs):
    server = start_server(tiny_path, {}, api_key="s3cret", admin_key=None)
    try:
        assert post(server.url, {"model": str(tiny_path), "messages": MESSAGES})[0] == 401
        assert post(server.url, {"model": str(tiny_path), "messages": MESSAGES}, "wrong")[0] == 401
        code, body = post(server.url, {"model": str(tiny_path), "messages": MESSAGES, "max_tokens": 4}, "s3cret")
        assert code == 200 and body["usage"]["completion_tokens"] >= 1
        assert [m.id for m in client(server, "s3cret").models.list().data] == [str(tiny_path)]
        code, body = post(server.url, {"lora_name": "cats", "lora_path": str(adapter_dirs["cats"])}, "s3cret",
                          "/v1/load_lora_adapter")
        assert code == 403 and "--admin-key" in body["error"]["message"], "no admin key configured: loading is off"
    finally:
        server.close()


def test_binding_beyond_loopback_without_a_key_is_refused(tiny_path):
    from tunesmith.errors import TunesmithError
    from tunesmith.serve.app import ServeSettings

    with pytest.raises(TunesmithError, match="API key"):
        ServeSettings(model=str(tiny_path), host="0.0.0.0").check_exposure()
    ServeSettings(model=str(tiny_path), host="0.0.0.0", api_key="k").check_exposure()
    ServeSettings(model=str(tiny_path)).check_exposure()


def test_a_full_queue_answers_429_not_500(tiny_path, adapter_dirs):
    server = start_server(tiny_path, adapter_dirs, max_queue=1, max_batch_rows=1)
    codes: list[int] = []
    try:
        def ask() -> None:
            codes.append(post(server.url, {"model": "cats", "messages": MESSAGES, "max_tokens": 64,
                                           "stop": ["\u2603"]})[0])

        threads = [threading.Thread(target=ask) for _ in range(12)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        server.close()
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
