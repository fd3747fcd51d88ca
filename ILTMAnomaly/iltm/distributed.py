"""Data parallelism over processes started by ``torchrun`` (one per GPU, or several CPU processes with gloo).

Everything degrades to a single process when torchrun's environment variables are absent, so the training loop
calls these helpers unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes; returns the device this rank should use."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(items: list) -> list:
    """This rank's share of ``items`` (strided, so every rank gets a similar mix)."""
    return items[rank()::world_size()]


def all_gather(items: list) -> list:
    """Every rank's ``items`` (picklable) concatenated in rank order, on every rank; ``items`` itself when alone."""
    if not dist.is_initialized():
        return items
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel when in a process group, else the model itself."""
    if not dist.is_initialized():
        return model
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def sum_across_ranks(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
