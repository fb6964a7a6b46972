"""Several processes, one run: torchrun launches them, torch.distributed (gloo on CPU, NCCL on GPUs)
connects them, DistributedDataParallel keeps their weights in sync.

    tunesmith train RECIPE --nproc 2          # = torchrun --standalone --nproc-per-node 2 -m tunesmith.cli train RECIPE

Every process reads and checks the data; rank 0 tokenises it once and shares the rows through a
cache file; each optimizer step's global batch is split across the ranks; only rank 0 writes the
output folder (recipe, metrics, checkpoints, artifacts). `micro_batch_size` is per process, so the
global batch is micro_batch_size x gradient_accumulation x processes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tunesmith.errors import TunesmithError

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a distributed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def launched() -> bool:
    """This process was started by torchrun (or a launcher that sets the same env:// variables): join its group.

    One process counts too: `torchrun --nproc-per-node 1` on a one-GPU machine runs DDP over NCCL, a group of one."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def in_group() -> bool:
    """A process group is up: gradients are synced through DDP/FSDP/DeepSpeed, however many ranks it holds."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(device_type: str) -> None:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); split the CPU cores between ranks."""
    import torch
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    if device_type == "cpu":  # two processes with all cores' threads each thrash (measured 6x slower on 2 cores)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def finish() -> None:
    """Leave the process group (after every rank is done)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (values unchanged in one process)."""
    import torch
    import torch.distributed as dist

    if world()[1] == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def shared(key: str, build: Callable[[], T], cache: Path) -> T:
    """Build once on rank 0 and hand the result to every rank through a file (tokenised rows, ...)."""
    import torch

    rank, size = world()
    if size == 1:
        return build()
    path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    if rank == 0:
        value = build()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(value, tmp)
        tmp.replace(path)
    barrier()
    if rank != 0:
        value = torch.load(path, weights_only=False)
    barrier()
    if rank == 0:
        path.unlink(missing_ok=True)
    return value


def wrap(module: Any, device_type: str) -> Any:
    """DistributedDataParallel over `module` (its parameters broadcast from rank 0 at once)."""
    from torch.nn.parallel import DistributedDataParallel

    kwargs = {"device_ids": [int(os.environ.get("LOCAL_RANK", "0"))]} if device_type == "cuda" else {}
    return DistributedDataParallel(module, find_unused_parameters=False, **kwargs)


def shard(root: Any, model: Any) -> Any:
    """FSDP2 (`fully_shard`): each transformer block is a unit, `root` (whose forward runs the step) holds the rest."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = next((m for m in base.modules() if isinstance(m, __import__("torch").nn.ModuleList)), None)
    if blocks is None:
        raise TunesmithError("training.parallel fsdp: found no list of transformer blocks to shard in this model")
    for block in blocks:
        fully_shard(block)
    fully_shard(root)
    return root


# Keys of a DeepSpeed config that the recipe owns: DeepSpeed must not re-batch, re-clip or re-schedule the run.
_RECIPE_OWNED = {"train_batch_size": None, "train_micro_batch_size_per_gpu": "training.micro_batch_size",
                 "gradient_accumulation_steps": "training.gradient_accumulation",
                 "gradient_clipping": "training.max_grad_norm", "optimizer": "training (AdamW, learning_rate)",
                 "scheduler": "training.lr_schedule"}


def deepspeed_config(training: Any) -> dict:
    """The DeepSpeed config for this run: the user's file (ZeRO stage 1-2, offload, communication settings)
    with the batch, clipping and accumulation the recipe defines. Problems are one-line errors naming the file."""
    import json

    user: dict = {"zero_optimization": {"stage": 2}}
    if training.deepspeed:
        path = Path(training.deepspeed)
        if not path.is_file():
            raise ValueError(f"training.deepspeed: {path} does not exist; give a DeepSpeed JSON config file")
        try:
            user = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"training.deepspeed: {path} is not valid JSON (line {getattr(exc, 'lineno', '?')}); "
                             "fix the file") from None
        if not isinstance(user, dict):
            raise ValueError(f"training.deepspeed: {path} must hold a JSON object")
        for key, owner in _RECIPE_OWNED.items():
            if key in user and user[key] != "auto":
                raise ValueError(f"training.deepspeed: {path}: remove \"{key}\" (or set it to \"auto\"); "
                                 f"tunesmith sets it from {owner or 'the recipe'}")
    stage = (user.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"training.deepspeed: ZeRO stage {stage} is not supported; stage 3 shards the weights, which "
                         "tunesmith does with training.parallel fsdp (use that), or use stage 1 or 2")
    config = {k: v for k, v in user.items() if k not in _RECIPE_OWNED}
    config.update(train_micro_batch_size_per_gpu=training.micro_batch_size,
                  gradient_accumulation_steps=training.gradient_accumulation,
                  gradient_clipping=training.max_grad_norm or 0.0, steps_per_print=2**62,
                  # the loop gives each micro-batch's loss already normalised by the step's target tokens
                  wall_clock_breakdown=False)
    return config


def deepspeed_engine(module: Any, optimizer: Any, schedule: Callable[[Any], Any], training: Any) -> Any:
    """A DeepSpeed engine over `module` with tunesmith's optimizer and `schedule(optimizer)` (DeepSpeed steps both)."""
    try:
        import deepspeed
    except ImportError:
        raise TunesmithError("training.parallel deepspeed: DeepSpeed is not installed; run `pip install deepspeed` "
                             "(or use parallel ddp or fsdp)") from None
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(training), dist_init_required=False)
    return engine


def full_tensor(tensor: Any) -> Any:
    """The whole tensor from a sharded one (a collective: every rank must call it); plain tensors pass through."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` processes on this machine; return its exit code."""
    if nproc < 2:
        raise TunesmithError("--nproc: give 2 or more processes (1 is the plain run)")
    if shutil.which("torchrun") is None and not _has_module("torch.distributed.run"):
        raise TunesmithError("--nproc needs torchrun (part of torch); reinstall torch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tunesmith.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    return subprocess.call(cmd, env=env)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
