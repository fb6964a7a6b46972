import pytest

from conftest import write_jsonl
from tunesmith.data.prompts import read_prompts, read_texts
from tunesmith.errors import TunesmithError


def test_prompts_from_txt_jsonl_alpaca_and_chats(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts(tmp_path / "p.txt") == [[{"role": "user", "content": "first"}], [{"role": "user", "content": "second"}]]
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi"},
        {"instruction": "Add", "input": "2 and 3"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    assert read_prompts(path) == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "Add\n\n2 and 3"}],
                                  [{"role": "user", "content": "q"}]]


def test_texts_from_files_and_their_errors(tmp_path):
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    assert read_texts(str(tmp_path / "t.txt")) == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(TunesmithError, match="file is empty; write one text per line"):
        read_texts(str(tmp_path / "empty.txt"))
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"text": ""}])
    with pytest.raises(TunesmithError, match=r"t.jsonl:2: text: expected a non-empty string"):
        read_texts(str(path))
    with pytest.raises(TunesmithError, match="file not found"):
        read_prompts(tmp_path / "missing.txt")
