from pathlib import Path

import pytest
import yaml

from conftest import REPO, SAMPLES, write_recipe
from tunesmith.config import Recipe, load_recipe
from tunesmith.errors import TunesmithError


def test_overrides_reach_nested_fields_and_parse_types(tmp_path):
    path = write_recipe(tmp_path)
    recipe = load_recipe(path, ["training.max_steps=7", "training.packing=true", "tuning.lora.r=8",
                                "tuning.lora.target_modules=[q_proj,v_proj]", "model=smollm2-135m-instruct"])
    assert recipe.training.max_steps == 7
    assert recipe.training.packing is True
    assert recipe.tuning.lora.r == 8
    assert recipe.tuning.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.model.path == "smollm2-135m-instruct"


def test_model_shorthand_and_nested_override(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["model.device=cpu"])
    assert recipe.model.path == "tiny" and recipe.model.device == "cpu"


def test_data_paths_are_relative_to_the_recipe_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "d/train.jsonl"}, "output_dir": "out"}))
    recipe = load_recipe(path)
    assert Path(recipe.data.train[0]) == tmp_path / "sub" / "d" / "train.jsonl"
    # ... while an override is relative to the working directory
    assert load_recipe(path, ["data.train=x.jsonl"]).data.train == ["x.jsonl"]


def test_misspelled_key_suggests_the_right_one_with_its_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train: a.jsonl\noutput_dir: o\ntraining:\n  learning_rat: 0.1\n")
    with pytest.raises(TunesmithError) as info:
        load_recipe(path)
    assert info.value.message == f"{path}:5: training.learning_rat: unknown key; did you mean 'learning_rate'?"


def test_misspelled_override_is_named_as_an_override(tmp_path):
    with pytest.raises(TunesmithError, match=r"command-line override: trainig: unknown key; did you mean 'training'"):
        load_recipe(write_recipe(tmp_path), ["trainig.max_steps=3"])


@pytest.mark.parametrize("override, field", [
    ("training.learning_rate=-1", "training.learning_rate"),
    ("tuning.lora.r=0", "tuning.lora.r"),
    ("training.micro_batch_size=0", "training.micro_batch_size"),
    ("stage=rlhf", "stage"),
    ("tuning.method=freeze", "tuning"),
    ("data.validation_fraction=1.5", "data.validation_fraction"),
])
def test_invalid_values_name_the_field(tmp_path, override, field):
    with pytest.raises(TunesmithError) as info:
        load_recipe(write_recipe(tmp_path), [override])
    assert f": {field}: " in info.value.message
    assert "\n" not in info.value.message


def test_invalid_value_in_file_names_its_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train: a.jsonl\noutput_dir: o\ntuning:\n  lora:\n    r: 0\n")
    with pytest.raises(TunesmithError) as info:
        load_recipe(path)
    assert info.value.message.startswith(f"{path}:6: tuning.lora.r: Input should be greater than 0")


def test_missing_data_is_reported(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: o\n")
    with pytest.raises(TunesmithError, match=r"data: required but missing"):
        load_recipe(path)


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(TunesmithError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(TunesmithError, match=r"bad.yaml:\d+: not valid YAML"):
        load_recipe(bad)


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["training.max_steps=5"])
    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


SHIPPED = sorted((REPO / "examples").glob("*.yaml")) + sorted((REPO / "examples" / "rlhf").glob("*.yaml")) + [
    SAMPLES / "quickstart.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid_and_says_how_to_run_it(path):
    from tunesmith.config import is_chain, load_chain

    recipes = [s.recipe for s in load_chain(path).steps if s.recipe] if is_chain(path) else [load_recipe(path)]
    header = path.read_text().splitlines()[:5]
    assert any("tunesmith " in line and line.startswith("#") for line in header), "header must give the command"
    for recipe in recipes:
        for file in recipe.data.train + (recipe.data.validation or []):
            assert Path(file).exists() or str(Path(file).resolve()).startswith(str(REPO.parent / "shared")), file


def test_classifier_prompt_needs_a_text_slot(tmp_path):
    with pytest.raises(TunesmithError, match=r"classifier.prompt: the prompt needs a \{text\} slot"):
        load_recipe(write_recipe(tmp_path), ["stage=classify", "classifier.prompt=Say the sentiment"])
    recipe = load_recipe(write_recipe(tmp_path, tuning={}), ["stage=classify"])
    assert recipe.tuning.method == "none"  # classify starts from a frozen base unless told otherwise
