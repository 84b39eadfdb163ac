"""Distributed helpers with the invariants made visible: every rank calls each of them equally often.

Collective tensors live on the process group backend's device: NCCL (what Ray Train creates
for GPU workers) refuses CPU tensors, gloo refuses CUDA ones. One process (no process group)
is a world of one, and every helper returns at once.
"""

from __future__ import annotations

from typing import Any

import torch


def initialized() -> bool:
    """Whether this process is in a torch.distributed group (a launcher's, or one a run started)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def backend_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    if initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world() > 1:
        torch.distributed.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks (float64, on the backend's device)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=backend_device())
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def all_max(values: list[float]) -> list[float]:
    """The largest value of each position over all ranks."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=backend_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.cpu().tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    # all_gather_object moves its byte tensors to the current CUDA device under NCCL itself.
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (the others pass anything, e.g. None)."""
    if world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, device=backend_device())
    return box[0]


def agree_on_error(error: BaseException | None) -> None:
    """A collective check point: if any rank failed, every rank raises (the first failure's message).

    Call it where ranks would otherwise meet in a collective that a failed rank never reaches:
    the failed rank passes its exception, the others None, and all of them raise the same
    error, so none waits for a peer that will not come.
    """
    texts = gather_objects(None if error is None else f"{type(error).__name__}\0{error}")
    failed = [(r, t) for r, t in enumerate(texts) if t is not None]
    if not failed:
        return
    if error is not None:
        raise error
    r, text = failed[0]
    kind, _, message = text.partition("\0")
    raise PeerError(f"rank {r} failed: {message}", kind)


class PeerError(RuntimeError):
    """Another rank failed at a check point; the message is that rank's error."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


class ProcessGroup:
    """This process's place in the torch.distributed group, in the shape `raytag.cluster.run.Group` wants."""

    def __init__(self, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank(), world(), local_rank

    def barrier(self) -> None:
        barrier()

    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj)

    def gather(self, obj: Any) -> list[Any]:
        return gather_objects(obj)

    def agree(self, error: BaseException | None) -> None:
        agree_on_error(error)


def group(local_rank: int = 0) -> ProcessGroup:
    return ProcessGroup(local_rank)
