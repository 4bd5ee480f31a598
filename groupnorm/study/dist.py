"""Multi-process support (``torchrun``): DDP with gloo on CPU, NCCL on GPU.

Everything here is a no-op in a single process, so the training loop reads the same
either way. Under torchrun the total batch of a step is split across processes (each
takes a contiguous share), BN statistics stay per process (as in the paper) unless the
norm is ``syncbn``, and BN running buffers are averaged across processes before each
evaluation, which is exactly what ghost batches compute in one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as td


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def rank() -> int:
    return td.get_rank() if is_dist() else 0


def init_from_env(device: str = "cpu") -> bool:
    """Initialize the process group if launched by torchrun (``WORLD_SIZE`` > 1).

    Returns True when running distributed. Backend: NCCL for ``device="cuda"`` (each
    process on GPU ``LOCAL_RANK``), gloo for the CPU.
    """
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend=backend)
    return True


def shutdown(finished: bool = True) -> None:
    """Destroy the process group (if any) before the interpreter exits.

    ``finished``: every rank got to the end (then they first meet at a barrier, so that no
    rank tears gloo down while rank 0 still writes the report). After an error on one rank
    the others may never arrive, so then there is no barrier. A rank could still abort in a
    C++ destructor at interpreter exit after all this ("terminate called without an active
    exception", exit code -6, seen once more with the barrier): the console entry point
    ends torchrun workers with ``os._exit`` (:func:`groupnorm.cli.run`).
    """
    if is_dist():
        if finished:
            td.barrier()
        td.destroy_process_group()


def device_for(device: str) -> torch.device:
    """The torch device of this process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
        if device == "cuda" and is_dist():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def _comm_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list) -> list:
    """Sum a list of numbers over processes (identity in one process)."""
    if not is_dist():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    td.all_reduce(t)
    return t.cpu().tolist()


@torch.no_grad()
def average_buffers(model: torch.nn.Module) -> None:
    """Average the floating-point buffers (BN running stats) over processes."""
    if not is_dist():
        return
    for b in model.buffers():
        if b.is_floating_point():
            td.all_reduce(b)
            b.div_(world_size())


def barrier() -> None:
    if is_dist():
        td.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process."""
    if not is_dist():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]
