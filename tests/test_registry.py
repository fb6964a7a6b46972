import json

import pytest

from conftest import chat_rows, run_cli, write_jsonl, write_recipe
from stages.helpers import train
from tunesmith import adapters
from tunesmith.adapters import add_adapter, check_name, get_adapter, list_adapters, remove_adapter
from tunesmith.errors import TunesmithError


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    write_jsonl(folder / "train.jsonl", chat_rows(8))
    train(write_recipe(folder), ["training.max_steps=2"])
    return folder / "out"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    root = tmp_path / "registry"
    monkeypatch.setattr(adapters, "registry_dir", lambda: root)
    return root


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 65, "a..b", "sp ace"])
def test_names_that_could_be_paths_are_refused(name):
    with pytest.raises(TunesmithError, match="use 1-64 letters"):
        check_name(name)


def test_add_list_show_remove(lora_run, registry):
    entry = add_adapter(lora_run, "greeter", root=registry)
    assert (entry.name, entry.base, entry.task) == ("greeter", "tiny", "sft")
    assert entry.size_bytes > 0 and "eval_loss_after" in entry.metrics
    assert (registry / "greeter" / "adapter_config.json").is_file()
    assert [e.name for e in list_adapters(registry)] == ["greeter"]
    assert get_adapter("greeter", registry) == entry
    with pytest.raises(TunesmithError, match="already registered"):
        add_adapter(lora_run, "greeter", root=registry)
    remove_adapter("greeter", registry)
    assert list_adapters(registry) == []
    with pytest.raises(TunesmithError, match="'greeter' is not registered"):
        get_adapter("greeter", registry)


def test_a_folder_without_an_adapter_is_refused(tmp_path, registry):
    with pytest.raises(TunesmithError, match="no adapter_config.json here"):
        add_adapter(tmp_path, "x", root=registry)


def test_cli_registry_round_trip_and_export(lora_run, registry, tmp_path, capsys):
    code, out, err = run_cli("adapters", "add", str(lora_run), "--name", "numbers", "--task", "counting", capsys=capsys)
    assert code == 0, err
    code, out, _ = run_cli("adapters", "list", capsys=capsys)
    assert "numbers" in out and "counting" in out
    code, out, _ = run_cli("adapters", "show", "numbers", capsys=capsys)
    assert json.loads(out)["base"] == "tiny"
    code, out, err = run_cli("adapters", "export", "numbers", "--merged", str(tmp_path / "merged"), capsys=capsys)
    assert code == 0, err
    assert "max |logit difference|" in out and (tmp_path / "merged" / "model.safetensors").is_file()
    code, _, err = run_cli("adapters", "remove", "../numbers", capsys=capsys)
    assert code == 2 and "use 1-64 letters" in err
    code, _, _ = run_cli("adapters", "remove", "numbers", capsys=capsys)
    assert code == 0 and not (registry / "numbers").exists()
