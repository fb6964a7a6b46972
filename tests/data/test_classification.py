import json

import pytest

from conftest import write_jsonl
from tunesmith.data.classification import check_known, label_space, read_labeled
from tunesmith.errors import TunesmithError

KW = dict(text_field="text", label_field="label", label_type="auto")


def test_int_labels_with_names_from_a_labels_file(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    (tmp_path / "labels.json").write_text(json.dumps({"0": "negative", "1": "positive"}))
    texts, skipped = read_labeled([str(path)], **KW)
    space = label_space(texts, str(tmp_path / "labels.json"), str(path))
    assert (space.names, space.keys, skipped) == (["negative", "positive"], [0, 1], 0)
    assert space.index(1) == 1


def test_string_labels_name_themselves_and_csv_ids_are_ints(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "sports"}, {"text": "b", "label": "world"}])
    texts, _ = read_labeled([str(path)], **KW)
    assert label_space(texts, None, "x").names == ["sports", "world"]
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\nhello,1\nbye,0\n")
    texts, _ = read_labeled([str(csv)], **KW)
    assert [t.label for t in texts] == [1, 0]


@pytest.mark.parametrize("row, label_type, expected", [
    ({"text": "  ", "label": 1}, "auto", ":1: text: empty text"),
    ({"label": 1}, "auto", ":1: text: missing"),
    ({"text": "x", "label": "positive"}, "int", ":1: label: expected an integer class id, got 'positive'"),
    ({"text": "x"}, "auto", ":1: label: missing"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, label_type, expected):
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(TunesmithError) as info:
        read_labeled([str(path)], text_field="text", label_field="label", label_type=label_type)
    assert info.value.message.startswith(f"{path}{expected}")
    assert "\n" not in info.value.message


def test_single_class_training_set_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    texts, _ = read_labeled([str(path)], **KW)
    with pytest.raises(TunesmithError, match=r"label: the training data has a single class \(1\)"):
        label_space(texts, None, str(path))


def test_a_label_never_seen_in_training_is_refused_with_its_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "c", "label": 1}, {"text": "d", "label": 2}])
    space = label_space(read_labeled([str(train)], **KW)[0], None, str(train))
    with pytest.raises(TunesmithError, match=rf"{test}:2: label: 2 never appears in the training data"):
        check_known(read_labeled([str(test)], **KW)[0], space)
