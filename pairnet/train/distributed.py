"""One model across processes with DistributedDataParallel (``torchrun``).

``torchrun --nproc-per-node N -m pairnet stage2 …`` starts N copies; each reads its rank
from the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE). Every rank builds the
same model (DDP copies rank 0's weights to the others when it wraps the model), draws the
same batch order and trains on its own shard of every batch; gradients are averaged across
ranks, so every rank ends with the same weights. Only rank 0 talks to MLflow, writes the
checkpoint and registers the model: the others receive what they need (a resume state)
from it over the process group. With one process nothing here does anything.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Rank()


def from_env() -> Rank:
    """This process's place, as torchrun describes it (one process when it did not start us)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Rank(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str) -> tuple[Rank, str]:
    """Join the process group (NCCL on CUDA, gloo on the CPU); returns this rank and the
    device it trains on (``cuda:<local rank>`` on GPUs)."""
    me = from_env()
    if not me.distributed:
        return me, device
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(me.local)
        device = f"cuda:{me.local}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return me, device


def current() -> Rank:
    """This rank inside an initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Rank(dist.get_rank(), dist.get_world_size(), from_env().local)
    return SINGLE


def share(obj, me: Rank):
    """Rank 0's ``obj`` on every rank (any picklable object: a resume state, a decision)."""
    if not me.distributed:
        return obj
    box = [obj if me.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(me: Rank) -> None:
    if me.distributed:
        dist.barrier()


def teardown(me: Rank) -> None:
    if me.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(me: Rank) -> Iterator[None]:
    """Leave the process group however the work ends."""
    try:
        yield
    finally:
        teardown(me)


def log_final_weights(me: Rank, digest: str) -> None:
    if me.distributed:  # every rank says it, so anyone can check they agree
        log.info("rank %d of %d: final weights %s", me.rank, me.world, digest)
