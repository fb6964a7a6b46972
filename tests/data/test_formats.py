import json

import pytest

from conftest import write_jsonl
from tunesmith.data.formats import detect_format, load_examples, read_rows
from tunesmith.errors import TunesmithError

ALPACA = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}


def test_jsonl_json_csv_parquet_and_saved_dataset_read_the_same(tmp_path):
    rows = [ALPACA, {"instruction": "Name a colour.", "input": "warm", "output": "Red"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    import csv

    with (tmp_path / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "saved"):
        loaded = load_examples([str(tmp_path / name)])
        assert loaded.format == "alpaca", name
        assert [e.messages for e in loaded.examples] == [
            [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
            [{"role": "user", "content": "Name a colour.\n\nwarm"}, {"role": "assistant", "content": "Red"}],
        ], name


def test_line_numbers_are_real_lines(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"text": "a"},\n\n  {"text": "b"}\n]\n')
    assert [r.line for r in read_rows(tmp_path / "a.json")] == [2, 4]
    (tmp_path / "a.csv").write_text('text\n"multi\nline"\nsecond\n')
    assert [r.line for r in read_rows(tmp_path / "a.csv")] == [2, 4]
    write_jsonl(tmp_path / "a.jsonl", ['{"text": "a"}', "", '{"text": "b"}'])
    assert [r.line for r in read_rows(tmp_path / "a.jsonl")] == [1, 3]


def test_messages_and_sharegpt(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
    ])
    loaded = load_examples([str(tmp_path / "m.jsonl")])
    assert loaded.format == "messages"
    assert loaded.examples[1].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]


def test_text_format_and_explicit_override(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"body": "Some text."}])
    with pytest.raises(TunesmithError, match="cannot tell the data format"):
        load_examples([str(tmp_path / "t.jsonl")])
    loaded = load_examples([str(tmp_path / "t.jsonl")], fmt="text", text_field="body")
    assert loaded.examples[0].text == "Some text."


@pytest.mark.parametrize("content, expected", [
    ("", "file is empty"),
    ('{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": \n', r":2: not valid JSON"),
])
def test_unreadable_files(tmp_path, content, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(TunesmithError, match=expected):
        load_examples([str(path)])


def test_missing_file_and_unknown_file_type(tmp_path):
    with pytest.raises(TunesmithError, match="file not found"):
        load_examples([str(tmp_path / "missing.jsonl")])
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(TunesmithError, match="unknown file type '.xml'"):
        load_examples([str(tmp_path / "d.xml")])


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "x"}, ":1: output: missing"),
    ({"instruction": "x", "output": "   "}, ":1: output: empty"),
    ({"instruction": 3, "output": "y"}, ":1: instruction: expected a string, got int"),
    ({"messages": [{"role": "robot", "content": "x"}]}, ":1: messages[0].role: expected one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "x"}]}, ":1: messages: no assistant message to learn from"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
     ":1: messages[0].content: expected a string, got list"),
    ({"messages": "hello"}, ":1: messages: expected a non-empty list"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    fmt = "messages" if "messages" in row else "alpaca"
    with pytest.raises(TunesmithError) as info:
        load_examples([str(path)], fmt=fmt)
    assert info.value.message.splitlines()[0] == f"{path}{expected}" or \
        info.value.message.splitlines()[0].startswith(f"{path}{expected}")


def test_first_ten_problems_then_a_count(tmp_path):
    rows = [ALPACA] + [{"instruction": "x", "output": ""}] * 13
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(TunesmithError) as info:
        load_examples([str(path)])
    lines = info.value.message.splitlines()
    assert lines[:10] == [f"{path}:{n}: output: empty" for n in range(2, 12)]
    assert lines[10] == "... and 3 more bad rows"
    assert "13 of 14 rows are invalid" in lines[11] and "skip_bad_rows" in lines[11]


def test_skip_bad_rows_counts_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, {"instruction": "x"}, "[1, 2]", ALPACA])
    loaded = load_examples([str(path)], skip_bad_rows=True)
    assert (len(loaded.examples), loaded.skipped) == (2, 2)


def test_detect_format_prefers_chat_keys(tmp_path):
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", [{"messages": [], "text": "x"}]))
    assert detect_format(rows) == "messages"
