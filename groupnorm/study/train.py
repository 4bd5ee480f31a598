"""One training run of the study: a single readable loop (in the spirit of nanoGPT's train.py).

A run gets a resolved run config (see :func:`groupnorm.study.config.run_configs`) and a
:class:`~groupnorm.study.data.Dataset`, and returns a dict of results and curves.

Per-device batches: each optimizer step takes ``total_batch`` samples. They are
split into ``ghosts = total_batch / per_device_batch`` consecutive micro-batches that
batch-statistics norms normalize separately (one per simulated device), while the loss,
and so the gradient, is averaged over the whole step, exactly as synchronous data-
parallel SGD with unsynchronized BN does. Under ``torchrun`` each process takes its
contiguous share of the same step, so the split into devices is identical.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .atomic import write_atomic
from .data import Dataset
from .models import build_model
from .norms import GhostBatchNorm


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warmup from ~0 to ``peak`` over ``warmup_steps``, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_model(rc: dict, data: Dataset) -> nn.Module:
    """Build the run's model with its norm, seeded by the run seed."""
    torch.manual_seed(rc["seed"])
    steps_per_epoch = max(1, len(data.y_train) // rc["total_batch"])
    return build_model(
        rc["model"], rc["norm"], data.in_channels, data.num_classes, dims=data.dims, depth=rc["depth"],
        width=rc["width"], widths=rc["widths"], convs_per_stage=rc["convs_per_stage"],
        zero_init_last=rc["zero_init_last"], ghost_size=rc["per_device_batch"],
        num_groups=rc.get("num_groups"), group_size=rc.get("group_size"), eps=rc["eps"],
        momentum=rc["bn_momentum"], rmax=rc["rmax"], dmax=rc["dmax"],
        renorm_warmup_steps=int(rc["renorm_warmup_epochs"] * steps_per_epoch),
    )


def param_groups(model: nn.Module, weight_decay: float, wd_norm: bool):
    """SGD parameter groups; without ``wd_norm`` gamma/beta and biases get no decay."""
    if wd_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip (2-D images)."""
    if x.dim() != 4:
        return x
    n, _, h, w = x.shape
    xp = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (n,), generator=gen)
    j = torch.randint(0, 9, (n,), generator=gen)
    d = x.device  # random numbers from the CPU generator, indices on the data's device
    i, j = i.to(d), j.to(d)
    b = torch.arange(n, device=d)[:, None, None]
    r = (i[:, None] + torch.arange(h, device=d))[:, :, None]
    c = (j[:, None] + torch.arange(w, device=d))[:, None, :]
    out = xp.permute(0, 2, 3, 1)[b, r, c].permute(0, 3, 1, 2).contiguous()  # (n, C, h, w) crops
    flip = (torch.rand(n, generator=gen) < 0.5).to(d)
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(error %, mean loss) of ``model`` in eval mode (BN uses its running statistics)."""
    model.eval()
    wrong, loss, n = 0, 0.0, 0
    # under torchrun each process evaluates a strided share, then the counts are summed
    idx = torch.arange(dist.rank(), len(y), dist.world_size(), device=y.device)
    for s in range(0, len(idx), batch):
        b = idx[s:s + batch]
        out = model(x[b])
        loss += F.cross_entropy(out, y[b], reduction="sum").item()
        wrong += (out.argmax(1) != y[b]).sum().item()
        n += len(b)
    wrong, loss, n = dist.all_sum([wrong, loss, n])
    model.train()
    return 100.0 * wrong / max(n, 1), loss / max(n, 1)


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (a kill leaves the previous checkpoint
    or the new one, never a torn file)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: Optional[str], key: str) -> Optional[dict]:
    """The checkpoint at ``path`` if it belongs to run ``key`` (else None: start afresh)."""
    if not path or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state if state.get("key") == key else None


def train_run(rc: dict, data: Dataset, *, progress: bool = False, desc: str = "",
              max_steps: Optional[int] = None, keep_model: bool = False, device: str = "cpu",
              checkpoint: Optional[str] = None) -> dict:
    """Train one configuration and return its results and curves.

    Args:
        rc (dict): a resolved run config from :func:`~groupnorm.study.config.run_configs`.
        data (Dataset): the data, in memory.
        progress (bool): show a tqdm bar with ETA for this run.
        desc (str): the bar's label.
        max_steps (int, optional): stop early (tests only; the result says so).
        keep_model (bool): also return the trained model under ``"model"``.
        device (str): ``cpu`` or ``cuda`` (not part of the run's identity).
        checkpoint (str, optional): file for an end-of-epoch checkpoint (model, optimizer,
            random generator, curve). If it exists and belongs to this run, training resumes
            after its epoch and gives the same result as an uninterrupted run; the caller
            deletes it once the result is saved.

    Returns:
        dict: ``error`` (median val error % of the last ``median_last`` epochs),
        ``curve`` (epoch, train_loss, train_err, val_err, val_loss), timing, ``diverged``.
    """
    world, rank = dist.world_size(), dist.rank()
    T, n = rc["total_batch"], rc["per_device_batch"]
    if T % world or (T // world) % n:
        raise ValueError(f"total batch {T} must split into {world} processes x whole devices of {n} samples; "
                         f"choose --total-batch (or --devices) so that total / processes is a multiple of {n}")
    N = len(data.y_train)
    steps_per_epoch = N // T
    if steps_per_epoch < 1:
        raise ValueError(f"training set of {N} samples is smaller than one step of {T}; lower the batch "
                         "or use more data (--train-size)")
    total_steps = rc["epochs"] * steps_per_epoch
    warmup_steps = int(round(rc["warmup_epochs"] * steps_per_epoch))
    eval_at = {round(steps_per_epoch * (k + 1) / rc["evals_per_epoch"]) for k in range(rc["evals_per_epoch"])}

    dev = dist.device_for(device)
    model = make_model(rc, data).to(dev)
    x_train, y_train = data.x_train.to(dev), data.y_train.to(dev)
    x_test, y_test = data.x_test.to(dev), data.y_test.to(dev)
    if world > 1:
        # bn statistics stay per process (syncbn all-reduces its own). Buffers are not
        # broadcast: each process keeps its own BN running stats; they are averaged before
        # every evaluation (dist.average_buffers), as ghost batches do in one process.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers rename notice
            ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                                  device_ids=[dev.index] if dev.type == "cuda" else None)
    else:
        ddp = model
    opt = torch.optim.SGD(param_groups(model, rc["weight_decay"], rc["wd_norm"]), lr=rc["lr_scaled"],
                          momentum=rc["momentum"])
    gen = torch.Generator().manual_seed(rc["seed"])
    share = slice(rank * T // world, (rank + 1) * T // world)  # this process's devices

    curve, t0, step, diverged, first_epoch = [], time.time(), 0, False, 0
    checkpoint = checkpoint if "key" in rc else None  # a checkpoint belongs to a keyed run
    state = load_checkpoint(checkpoint, rc["key"]) if checkpoint and rank == 0 else None
    if world > 1:  # rank 0 decides (other machines may not see its file) and sends the state
        state = dist.broadcast_object(state)
    if state is not None:  # resume after the last finished epoch
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        curve, step, first_epoch = state["curve"], state["step"], state["epoch"]
        t0 -= state["time_s"]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=min(total_steps, max_steps or total_steps), initial=step, desc=desc, leave=False,
                   unit="step", dynamic_ncols=True)
    model.train()
    for epoch in range(first_epoch, rc["epochs"]):
        perm = torch.randperm(N, generator=gen)  # same permutation on every process
        run_loss = run_wrong = run_n = 0.0
        for s in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, rc["lr_scaled"])
            idx = perm[s * T:(s + 1) * T][share].to(dev)
            x, y = x_train[idx], y_train[idx]
            if rc["augment"]:
                x = augment(x, gen)
            out = ddp(x)  # BN layers normalize each run of n samples on its own
            loss = F.cross_entropy(out, y)
            bad = not bool(torch.isfinite(loss))
            if world > 1:  # all processes must stop together, or the others would hang
                bad = dist.all_sum([bad])[0] > 0
            if bad:
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.item() * len(y)
            run_wrong += (out.argmax(1) != y).sum().item()
            run_n += len(y)
            step += 1
            if bar is not None:
                bar.update(1)
            if s + 1 in eval_at:
                dist.average_buffers(model)
                val_err, val_loss = evaluate(model, x_test, y_test)
                tl, tw, tn = dist.all_sum([run_loss, run_wrong, run_n])
                curve.append(dict(epoch=epoch + (s + 1) / steps_per_epoch, train_loss=tl / tn,
                                  train_err=100.0 * tw / tn, val_err=val_err, val_loss=val_loss,
                                  time_s=time.time() - t0))
                if bar is not None:
                    bar.set_postfix(val_err=f"{val_err:.2f}")
            if max_steps is not None and step >= max_steps:
                break
        if diverged or (max_steps is not None and step >= max_steps):
            break
        if checkpoint and rank == 0 and epoch + 1 < rc["epochs"]:
            # every process holds the same model and generator state here (DDP keeps
            # parameters in sync; BN running statistics were averaged at the last evaluation)
            save_checkpoint(checkpoint, dict(key=rc["key"], epoch=epoch + 1, step=step, curve=curve,
                                             time_s=time.time() - t0, model=model.state_dict(),
                                             opt=opt.state_dict(), gen=gen.get_state()))
    if bar is not None:
        bar.close()
    dist.average_buffers(model)  # the final model holds the processes' mean BN statistics

    epoch_ends = [c["val_err"] for c in curve if abs(c["epoch"] - round(c["epoch"])) < 1e-9]
    last = epoch_ends[-rc["median_last"]:]
    out = dict(
        error=100.0 if diverged or not last else statistics.median(last),
        last_val_errs=last,
        final_train_err=curve[-1]["train_err"] if curve else float("nan"),
        curve=curve, steps=step, steps_per_epoch=steps_per_epoch, time_s=time.time() - t0,
        diverged=diverged, truncated=max_steps is not None and step < total_steps,
        num_params=sum(p.numel() for p in model.parameters()),
        bn_like_layers=sum(isinstance(m, GhostBatchNorm) for m in model.modules()),
    )
    if keep_model:
        out["model"] = model
    return out
