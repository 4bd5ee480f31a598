"""Configuration of the study: one dataclass, exposed 1:1 as command-line flags.

Every field of :class:`StudyConfig` is a flag (``train_size`` -> ``--train-size``; lists
take several values, booleans have ``--no-...``). A preset fills the fields first, then
explicit flags override it. Per-run settings are resolved by :func:`run_configs` into
plain dicts; the hash of such a dict is the run's key, so a finished run is never redone.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field



@dataclass
class StudyConfig:
    """All knobs of the batch-size study (defaults = the paper's recipe on a small CPU run)."""

    preset: str = ""  # quick | paper; applied first, explicit flags override it
    # data
    data: str = "fashion-mnist"  # fashion-mnist | IDX dir | CIFAR python dir | image folder | .npz
    train_size: int = 0  # random training subset (0 = all)
    test_size: int = 0  # random test subset (0 = all)
    subset_seed: int = 0  # seed of those subsets (fixed across runs)
    augment: bool = False  # random crop (pad 4) + horizontal flip, for CIFAR-like data
    # model
    model: str = "plain"  # plain (VGG-style) | resnet (CIFAR-style, depth 6n+2)
    depth: int = 20  # resnet depth
    width: int = 1  # resnet width multiplier (stage widths 16k, 32k, 64k)
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])  # plain net stage widths
    convs_per_stage: int = 1  # plain net conv-norm-ReLU units per stage
    # the sweep
    norms: list[str] = field(default_factory=lambda: ["bn", "gn"])
    batch_sizes: list[int] = field(default_factory=lambda: [32, 16, 8, 4, 2, 1])  # per device
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    devices: int = 1  # simulated devices per step (ghost batches) when total_batch = 0
    total_batch: int = 32  # fixed batch per optimizer step (ghost batches); 0 = devices x per-device batch
    gn_groups: int = 0  # GN groups G (0: use gn_group_size)
    gn_group_size: int = 4  # GN channels per group (used when gn_groups = 0)
    ablation: list[str] = field(default_factory=list)  # GN grouping ablation: G<n> or C<n> (channels/group)
    ablation_batch: int = 32  # per-device batch of the ablation runs
    ablation_seeds: list[int] = field(default_factory=list)  # seeds of the ablation runs (empty: --seeds)
    # optimization (paper recipe)
    epochs: int = 4  # the same at every batch size
    lr: float = 0.1  # learning rate at base_batch; scaled linearly with the total batch
    base_batch: int = 32  # lr = lr * total_batch / base_batch
    momentum: float = 0.9
    weight_decay: float = 1e-4
    wd_norm: bool = True  # weight decay also on gamma/beta (as in the paper)
    warmup_epochs: float = 0.5  # linear warmup, then cosine to 0
    zero_init_last: bool = True  # gamma = 0 in the last norm of each residual block
    median_last: int = 2  # result = median val error of the last N epochs
    evals_per_epoch: int = 1  # validation points per epoch for the curves
    eps: float = 1e-5
    bn_momentum: float = 0.1
    rmax: float = 3.0  # batch renorm r clip
    dmax: float = 5.0  # batch renorm d clip
    renorm_warmup_epochs: float = 1.0  # rmax/dmax ramp from 1/0
    # running
    out: str = "study_out"  # output directory (runs/, results.csv, results.md, report.md, figures)
    device: str = "cpu"  # cpu | cuda (under torchrun: cuda:LOCAL_RANK, NCCL)
    threads: int = 0  # torch threads per process (0: cores / processes - 1, at least 1)
    progress: bool = True  # tqdm progress bars


PRESETS: dict[str, dict] = {
    # The README's main command; chosen by measurement on a 2-core CPU (see docs/study.md).
    "quick": dict(
        data="fashion-mnist", train_size=6000, test_size=5000, model="plain", widths=[16, 32, 64],
        convs_per_stage=1, norms=["bn", "gn"], batch_sizes=[32, 16, 8, 4, 2, 1], seeds=[0, 1],
        total_batch=32, epochs=4, lr=0.1, base_batch=32, warmup_epochs=0.5, median_last=2,
        evals_per_epoch=1, gn_groups=0, gn_group_size=4, ablation=["G1", "C1"], ablation_batch=32,
        ablation_seeds=[0],
        out="study_out/quick",
    ),
    # The paper's protocol (Wu & He 2018, Sec. 4.1) at full length: 8 devices simulated with
    # ghost batches, 32..2 images per device, lr 0.1 * N / 32, equal epochs, per-device BN.
    "paper": dict(
        data="fashion-mnist", train_size=0, test_size=0, model="resnet", depth=20, width=4,
        norms=["bn", "gn", "ln", "in"], batch_sizes=[32, 16, 8, 4, 2], seeds=[0, 1, 2], devices=8,
        total_batch=0, epochs=100, lr=0.1, base_batch=256, warmup_epochs=5, median_last=5,
        evals_per_epoch=1, gn_groups=32, gn_group_size=0,
        ablation=["G64", "G32", "G16", "G8", "G4", "G2", "C64", "C32", "C16", "C8", "C4", "C2"],
        ablation_batch=32, out="study_out/paper",
    ),
}


# ------------------------------------------------------------------------------ flags
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "groupnorm") -> argparse.ArgumentParser:
    """An argparse parser generated from the fields of :class:`StudyConfig`.

    All defaults are ``SUPPRESS`` so that only the flags actually given override the
    preset; ``--help`` shows the dataclass defaults.
    """
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="GroupNorm vs BatchNorm batch-size study (Wu & He, 2018) on offline data. "
                    "Example: groupnorm --preset quick",
    )
    hints = typing.get_type_hints(StudyConfig)
    defaults = StudyConfig()
    comments = _field_comments()
    for f in dataclasses.fields(StudyConfig):
        t, d = hints[f.name], getattr(defaults, f.name)
        help_ = comments.get(f.name, "") + f" (default: {d})"
        kw = dict(default=argparse.SUPPRESS, help=help_)
        if f.name == "preset":
            p.add_argument(_flag(f.name), choices=sorted(PRESETS), **kw)
        elif t is bool:
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(t) is list:
            (et,) = typing.get_args(t)
            p.add_argument(_flag(f.name), nargs="*", type=et, metavar=f.name.upper(), **kw)
        else:
            p.add_argument(_flag(f.name), type=t, **kw)
    p.add_argument("--report-only", action="store_true", default=False,
                   help="rebuild tables, plots and report from finished runs in --out; train nothing")
    p.add_argument("--list-norms", action="store_true", default=False, help="print the norm registry and exit")
    p.add_argument("--dry-run", action="store_true", default=False,
                   help="print the runs the sweep would do (and which are already done) and exit")
    return p


def _field_comments() -> dict[str, str]:
    """The trailing ``# comment`` of each field in the source: the flag's help text."""
    import inspect

    out = {}
    for line in inspect.getsource(StudyConfig).splitlines():
        s = line.strip()
        if ":" in s and "#" in s and not s.startswith(("#", '"')):
            name = s.split(":", 1)[0].strip()
            out[name] = s.split("#", 1)[1].strip()
    return out


def config_from_args(argv=None) -> tuple[StudyConfig, argparse.Namespace]:
    """Parse ``argv``: preset first, then explicit flags. Returns (config, namespace)."""
    ns = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(StudyConfig)}}
    cfg = make_config(**given)
    return cfg, ns


def make_config(preset: str = "", **overrides) -> StudyConfig:
    """A validated :class:`StudyConfig` from a preset name plus field overrides."""
    if preset and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown config field(s) {bad}; valid: {sorted(names)}")
    values = dict(PRESETS.get(preset, {}))
    values.update(overrides)
    cfg = StudyConfig(preset=preset, **values)
    validate(cfg)
    return cfg


def validate(cfg: StudyConfig) -> None:
    """Raise ``ValueError`` naming the bad values and the fix."""
    from .norms import NORMS

    for n in cfg.norms:
        if n not in NORMS:
            raise ValueError(f"--norms: unknown norm {n!r}; registered: {sorted(NORMS)}")
    if not cfg.batch_sizes or any(b < 1 for b in cfg.batch_sizes):
        raise ValueError(f"--batch-sizes must be positive integers, got {cfg.batch_sizes}")
    if not cfg.seeds:
        raise ValueError("--seeds needs at least one seed")
    if cfg.total_batch < 0 or cfg.devices < 1:
        raise ValueError(f"--total-batch must be >= 0 and --devices >= 1, got {cfg.total_batch}, {cfg.devices}")
    sizes = list(cfg.batch_sizes) + ([cfg.ablation_batch] if cfg.ablation else [])
    if cfg.total_batch:
        bad = [b for b in sizes if cfg.total_batch % b]
        if bad:
            raise ValueError(f"--total-batch {cfg.total_batch} is not a multiple of per-device batch(es) {bad}; "
                             "each optimizer step must hold a whole number of devices")
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.median_last < 1 or cfg.median_last > cfg.epochs:
        raise ValueError(f"--median-last must be in 1..epochs={cfg.epochs}, got {cfg.median_last}")
    if cfg.evals_per_epoch < 1:
        raise ValueError(f"--evals-per-epoch must be >= 1, got {cfg.evals_per_epoch}")
    if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda' (got {cfg.device!r})")
    if cfg.model not in ("plain", "resnet"):
        raise ValueError(f"--model must be 'plain' or 'resnet', got {cfg.model!r}")
    if cfg.model == "resnet" and (cfg.depth < 8 or (cfg.depth - 2) % 6):
        raise ValueError(f"--depth must be 6n+2 (8, 14, 20, 32, 56, 110) for resnet, got {cfg.depth}")
    if cfg.gn_groups < 0 or cfg.gn_group_size < 0 or (cfg.gn_groups == 0 and cfg.gn_group_size == 0):
        raise ValueError(f"set --gn-groups G > 0 or --gn-group-size > 0 (got {cfg.gn_groups}, {cfg.gn_group_size})")
    for a in cfg.ablation:
        parse_grouping(a)


def parse_grouping(s: str) -> dict:
    """``G8`` -> 8 groups; ``C4`` -> 4 channels per group. Returns num_groups/group_size."""
    try:
        kind, n = s[0].upper(), int(s[1:])
    except (ValueError, IndexError):
        kind, n = "", 0
    if kind not in ("G", "C") or n < 1:
        raise ValueError(f"--ablation entry {s!r}: write G<n> for n groups or C<n> for n channels per group, "
                         "e.g. --ablation G1 G8 C4")
    return {"num_groups": n, "group_size": None} if kind == "G" else {"num_groups": None, "group_size": n}


def total_batch(cfg: StudyConfig, per_device: int) -> int:
    """Samples per optimizer step: fixed ``total_batch`` or ``devices x per_device``."""
    return cfg.total_batch if cfg.total_batch else cfg.devices * per_device


def scaled_lr(lr: float, total: int, base_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017), as in the GN paper: lr * total / base_batch."""
    if total < 1 or base_batch < 1:
        raise ValueError(f"scaled_lr: batch sizes must be positive (total={total}, base_batch={base_batch})")
    return lr * total / base_batch


# Fields that do not change what a run computes, so they are not part of its key.
_NOT_IN_KEY = {"preset", "out", "device", "threads", "progress", "norms", "batch_sizes", "seeds", "ablation",
               "ablation_batch", "ablation_seeds", "gn_groups", "gn_group_size", "devices", "total_batch"}


def run_configs(cfg: StudyConfig) -> list[dict]:
    """Expand the sweep into resolved per-run dicts (deterministic order, no duplicates).

    Main grid: norms x per-device batch sizes x seeds. Ablation: GN at each grouping of
    ``cfg.ablation`` at ``cfg.ablation_batch`` x seeds.
    """
    base = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    default_group = parse_grouping(f"G{cfg.gn_groups}") if cfg.gn_groups else parse_grouping(f"C{cfg.gn_group_size}")

    def one(norm, n, seed, grouping, role):
        tb = total_batch(cfg, n)
        rc = dict(base, norm=norm, per_device_batch=n, total_batch=tb, ghosts=tb // n,
                  lr_scaled=scaled_lr(cfg.lr, tb, cfg.base_batch), seed=seed)
        if norm in ("gn", "gn+ws"):
            rc.update(grouping)
        rc["key"] = run_key(rc)
        rc["role"] = role
        return rc

    runs, seen = [], set()
    for norm in cfg.norms:
        for n in cfg.batch_sizes:
            for seed in cfg.seeds:
                runs.append(one(norm, n, seed, default_group, "main"))
    for a in cfg.ablation:
        for seed in cfg.ablation_seeds or cfg.seeds:
            runs.append(one("gn", cfg.ablation_batch, seed, parse_grouping(a), "ablation"))
    out = []
    for r in runs:
        if (r["key"], r["per_device_batch"]) not in seen:
            seen.add((r["key"], r["per_device_batch"]))
            out.append(r)
    return out


def batch_independent(norm: str) -> bool:
    """True if the norm's output does not depend on how the step is split into devices.

    GN/LN/IN/none are per sample, and syncbn uses the whole step; only ``bn`` and
    ``batchrenorm`` (and unknown user norms, to be safe) see the per-device batch.
    """
    return norm in ("gn", "gn+ws", "ln", "in", "none", "syncbn")


def run_key(rc: dict) -> str:
    """Hash of a resolved run config (its identity for resume).

    For a batch-independent norm the per-device batch (and so the number of ghosts) does
    not enter the key: with the same total batch, lr and data order the computation is
    identical, so one run serves every per-device batch of the table.
    """
    d = {k: v for k, v in rc.items() if k not in ("key", "role")}
    if batch_independent(rc["norm"]):
        d.pop("per_device_batch", None)
        d.pop("ghosts", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_label(rc: dict) -> str:
    """Human label of a run's norm, with the GN grouping when it matters."""
    n = rc["norm"]
    if n in ("gn", "gn+ws"):
        if rc.get("num_groups"):
            return f"{n} (G={rc['num_groups']})"
        return f"{n} ({rc['group_size']} ch/group)"
    return n


def config_json(cfg: StudyConfig) -> dict:
    return dataclasses.asdict(cfg)

