"""Training on several processes (`torchrun`, `accelerate launch`): which process this is,
which examples of a step it takes, and the few collectives training needs.

A launcher sets RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); WORLD_SIZE > 1 makes a run distributed. Every process draws the whole
step's batch from the same random stream, exactly as one process does, and takes its own
contiguous share of it (`World.shard`); the gradients of the shares are summed over the
processes, and each share's loss is divided by the token count of the whole batch, so the
summed gradient is the one process's gradient of the whole batch (DistributedDataParallel
averages per-rank means instead, which is not the one-process mean when the answers'
lengths differ, and refuses the trainable encoder's unused parameters without
`find_unused_parameters`). The head is small: one all-reduce of its flattened gradient per
step. gloo on CPUs, NCCL when the head trains on CUDA GPUs; setup's waits (one process
fills a cache the others read) go through a gloo group with a long timeout.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from edge_pllm.errors import InvalidInputError

# Setup's waits: one process embeds the histories while the others wait (hours on a large
# task); a process that fails ends the launch anyway (torchrun stops the others).
SETUP_TIMEOUT = timedelta(hours=24)

_sync_group: Any = None  # the gloo group for setup's waits and Python objects


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # among the processes on this machine
    local_size: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> World:
        """The world a launcher describes in the environment (none: one process)."""
        try:
            size = int(env.get("WORLD_SIZE", "1"))
            if size <= 1:
                return cls()
            rank = int(env["RANK"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_size = int(env.get("LOCAL_WORLD_SIZE", size))
        except (KeyError, ValueError) as exc:
            raise InvalidInputError(
                f"WORLD_SIZE is {env.get('WORLD_SIZE')!r} but the launch's environment is "
                f"incomplete or malformed ({exc}): start the processes with torchrun or "
                "accelerate launch, which set RANK, LOCAL_RANK and WORLD_SIZE.",
                field="world_size",
            ) from None
        return cls(rank, size, local_rank, local_size)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes, logs and shows progress."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous share of `n` items (a step's examples): shares differ
        by at most one item, and in rank order they are the `n` items in order."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def check_batch(self, batch_size: int) -> None:
        """Every process needs at least one example of each step."""
        if batch_size < self.size:
            raise InvalidInputError(
                f"--batch-size is the examples of a step across all {self.size} processes, "
                f"at least one each (got {batch_size}): pass --batch-size {self.size} or "
                "more, or start fewer processes.",
                field="batch_size",
            )

    # --- collectives (each a no-op for one process) ---------------------------------------

    def barrier(self) -> None:
        """Wait until every process is here (setup's waits: the long timeout)."""
        if self.size > 1:
            dist.barrier(group=_sync_group)

    @contextmanager
    def local_first(self) -> Iterator[None]:
        """The block runs on each machine's local rank 0 first, then on the others: for
        caches on disk that one process fills and the others read."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the processes, in place."""
        if self.size == 1:
            return tensor
        if dist.get_backend() == "gloo" and tensor.device.type != "cpu":  # e.g. mps
            on_cpu = tensor.cpu()
            dist.all_reduce(on_cpu)
            return tensor.copy_(on_cpu)
        dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Each parameter's gradient summed over the processes (one flat all-reduce).
        Parameters without a gradient (unused by the forward) keep none, on every process
        alike: the optimizer skips them as it does in one process."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.size == 1 or not grads:
            return
        flat = self.all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every process."""
        if self.size == 1:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                if dist.get_backend() == "gloo" and t.device.type != "cpu":
                    on_cpu = t.detach().cpu()
                    dist.broadcast(on_cpu, 0)
                    t.copy_(on_cpu)
                else:
                    dist.broadcast(t.data, 0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process (tensors in it come back on the CPU)."""
        if self.size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, 0, group=_sync_group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=_sync_group)
        return out


def join(device: torch.device, env: Mapping[str, str] = os.environ) -> World:
    """The world of this launch; under a launcher (WORLD_SIZE > 1) the process group is
    joined once (NCCL when `device` is a CUDA GPU, else gloo) and left at exit."""
    global _sync_group
    world = World.from_env(env)
    if world.size == 1:
        return world
    if not dist.is_available():
        raise InvalidInputError(
            "This torch build has no torch.distributed: train in one process.", field="world_size"
        )
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(_leave)
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise InvalidInputError(
            f"The process group ({dist.get_rank()} of {dist.get_world_size()}) is not the "
            f"launch's (RANK {world.rank} of WORLD_SIZE {world.size}).",
            field="world_size",
        )
    if _sync_group is None:
        _sync_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    return world


def _leave() -> None:
    global _sync_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _sync_group = None


__all__ = ["SETUP_TIMEOUT", "World", "join"]
