"""Data-parallel training with torchrun (gloo on CPU): 2 processes == 1 process with the same global batch; resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import chat_rows, run_cli, write_jsonl, write_recipe

from tunesmith.config import TrainingConfig
from tunesmith.stages.loop import micro_batch_rows


def tunesmith(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def losses(folder):
    return [(r["step"], r["loss"], r["tokens"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_ranks_split_each_global_micro_batch():
    rows = list(range(10))
    one = TrainingConfig(micro_batch_size=4, seed=3)
    two = TrainingConfig(micro_batch_size=2, seed=3)
    for index in range(5):  # across an epoch boundary (3 micro-batches per epoch of 10 rows at 4)
        whole = micro_batch_rows(rows, index, one, 3)
        shares = [micro_batch_rows(rows, index, two, 3, rank, 2) for rank in (0, 1)]
        if len(whole) == 4:
            assert shares[0] + shares[1] == whole
        else:  # the epoch's short last block wraps around so both ranks have rows
            assert shares[0] + shares[1][: len(whole) - 2] == whole and len(shares[1]) == 2


def test_two_processes_match_one_and_resume(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    recipe = write_recipe(tmp_path, training={"max_steps": 4, "learning_rate": 1e-3, "micro_batch_size": 4,
                                              "gradient_accumulation": 2, "max_length": 64,
                                              "lr_schedule": "constant", "seed": 0, "save_every": 2})
    one = tunesmith("train", str(recipe), f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = tunesmith("train", str(recipe), f"output_dir={tmp_path / 'two'}", "training.micro_batch_size=2", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 processes, global batch 4 rows x 2 accumulation" in two.stdout
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert [(s, round(loss, 4), t) for s, loss, t in losses(tmp_path / "one")] == \
        [(s, round(loss, 4), t) for s, loss, t in losses(tmp_path / "two")]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert not list((tmp_path / "two").glob("*rank*"))  # only rank 0 wrote, once

    # A distributed run stopped after its step-2 checkpoint resumes to the same weights.
    part = tunesmith("train", str(recipe), f"output_dir={tmp_path / 'part'}", "training.micro_batch_size=2",
                     "training.max_steps=2", "--nproc", "2")
    assert part.returncode == 0, part.stderr[-2000:]
    resumed = tunesmith("train", str(recipe), f"output_dir={tmp_path / 'part'}", "training.micro_batch_size=2",
                        "--nproc", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 2 of 4" in resumed.stdout
    c = weights(tmp_path / "part")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_torchrun_with_one_process_joins_a_group_of_one(tmp_path):
    """`torchrun --nproc-per-node 1` (a one-GPU machine's DDP over NCCL; gloo here) trains through DDP in a
    group of one and gives the plain run's weights."""
    write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    recipe = write_recipe(tmp_path, training={"max_steps": 2, "learning_rate": 1e-3, "micro_batch_size": 4,
                                              "max_length": 64, "lr_schedule": "constant", "seed": 0})
    assert tunesmith("train", str(recipe), f"output_dir={tmp_path / 'plain'}").returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    group = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                            "-m", "tunesmith.cli", "train", str(recipe), f"output_dir={tmp_path / 'group'}"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert group.returncode == 0, group.stderr[-2000:]
    assert "1 process (torchrun), global batch 4 rows x 1 accumulation" in group.stdout
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "group")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_fsdp_full_fine_tuning_matches_one_process_and_resumes(tmp_path):
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    recipe = write_recipe(tmp_path, tuning={"method": "full"},
                          training={"max_steps": 4, "learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64,
                                    "lr_schedule": "constant", "seed": 0, "save_every": 2})
    assert tunesmith("train", str(recipe), f"output_dir={tmp_path / 'one'}").returncode == 0
    sharded = ["training.micro_batch_size=2", "training.parallel=fsdp", "--nproc", "2"]
    two = tunesmith("train", str(recipe), f"output_dir={tmp_path / 'two'}", *sharded)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert tunesmith("train", str(recipe), f"output_dir={tmp_path / 'part'}", "training.max_steps=2", *sharded).returncode == 0
    resumed = tunesmith("train", str(recipe), f"output_dir={tmp_path / 'part'}", *sharded, "--resume")
    assert resumed.returncode == 0 and "resumed from step 2 of 4" in resumed.stdout, resumed.stderr[-2000:]
    c = load_file(tmp_path / "part" / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_nproc_is_refused_where_it_does_not_apply(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code, _, err = run_cli("train", str(write_recipe(tmp_path, stage="reward")), "--nproc", "2", capsys=capsys)
    assert code == 2 and "stage reward runs in one process" in err
    code, out, err = run_cli("train", str(write_recipe(tmp_path)), "--nproc", "1", capsys=capsys)
    assert code == 0, err  # 1 process is the plain run
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["processes"] == 1


def test_fsdp_is_for_full_fine_tuning(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    code, _, err = run_cli("train", str(write_recipe(tmp_path)), "training.parallel=fsdp", capsys=capsys)
    assert code == 2 and "training.parallel fsdp shards a fully trained model" in err


def test_deepspeed_zero_matches_one_process_and_resumes(tmp_path):
    """ZeRO stage 2 (LoRA) and stage 1 (full fine-tuning) on 2 CPU processes over gloo: the weights of one
    process with the same global batch, and an exact resume from DeepSpeed's own checkpoint."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    training = {"max_steps": 4, "learning_rate": 1e-3, "micro_batch_size": 4, "gradient_accumulation": 2,
                "max_length": 64, "lr_schedule": "constant", "seed": 0, "save_every": 2}
    lora = write_recipe(tmp_path, training=training)
    assert tunesmith("train", str(lora), f"output_dir={tmp_path / 'one'}").returncode == 0
    ds = ["training.micro_batch_size=2", "training.parallel=deepspeed", "--nproc", "2"]
    two = tunesmith("train", str(lora), f"output_dir={tmp_path / 'two'}", *ds)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert [round(loss, 4) for _, loss, _ in losses(tmp_path / "one")] == \
        [round(loss, 4) for _, loss, _ in losses(tmp_path / "two")]
    assert (tmp_path / "two" / "checkpoints" / "step-0000004" / "deepspeed" / "state").is_dir()
    part = tunesmith("train", str(lora), f"output_dir={tmp_path / 'part'}", "training.max_steps=2", *ds)
    assert part.returncode == 0, part.stderr[-3000:]
    resumed = tunesmith("train", str(lora), f"output_dir={tmp_path / 'part'}", *ds, "--resume")
    assert resumed.returncode == 0 and "resumed from step 2 of 4" in resumed.stdout, resumed.stderr[-3000:]
    c = weights(tmp_path / "part")
    assert all(torch.equal(b[k], c[k]) for k in b)

    (tmp_path / "zero1.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    full = write_recipe(tmp_path, tuning={"method": "full"}, training={**training, "save_every": None})
    assert tunesmith("train", str(full), f"output_dir={tmp_path / 'full1'}").returncode == 0
    zero1 = tunesmith("train", str(full), f"output_dir={tmp_path / 'full2'}", *ds,
                      f"training.deepspeed={tmp_path / 'zero1.json'}")
    assert zero1.returncode == 0, zero1.stderr[-3000:]
    a, b = load_file(tmp_path / "full1" / "model.safetensors"), load_file(tmp_path / "full2" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_deepspeed_config_problems_are_one_line_errors(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", chat_rows())
    recipe = str(write_recipe(tmp_path))
    cases = {"missing.json": None, "bad.json": "{not json", "list.json": "[1]",
             "owned.json": json.dumps({"optimizer": {"type": "Adam"}}),
             "stage3.json": json.dumps({"zero_optimization": {"stage": 3}})}
    expected = {"missing.json": "does not exist", "bad.json": "is not valid JSON (line 1)",
                "list.json": "must hold a JSON object", "owned.json": 'remove "optimizer"',
                "stage3.json": "ZeRO stage 3 is not supported"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        code, _, err = run_cli("train", recipe, "training.parallel=deepspeed", f"training.deepspeed={tmp_path / name}",
                               capsys=capsys)
        assert code == 2 and expected[name] in err and "Traceback" not in err, (name, err)
    code, _, err = run_cli("train", recipe, f"training.deepspeed={tmp_path / 'stage3.json'}", capsys=capsys)
    assert code == 2 and "set training.parallel deepspeed" in err


@pytest.mark.slow
def test_compiled_blocks_under_ddp_match_one_eager_process(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    recipe = write_recipe(tmp_path, training={"max_steps": 4, "learning_rate": 1e-3, "micro_batch_size": 4,
                                              "gradient_accumulation": 2, "max_length": 64, "packing": True,
                                              "lr_schedule": "constant", "seed": 0})
    assert tunesmith("train", str(recipe), f"output_dir={tmp_path / 'one'}").returncode == 0
    two = tunesmith("train", str(recipe), f"output_dir={tmp_path / 'two'}", "training.micro_batch_size=2",
                    "training.compile=true", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
