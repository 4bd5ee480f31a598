"""The resumable sweep: norms x per-device batch sizes x groups x seeds.

Layout of ``cfg.out``::

    runs/<key>/config.json   resolved run config + package version (written before training)
    runs/<key>/checkpoint.pt end-of-epoch state of an unfinished run (resumed from, then deleted)
    runs/<key>/result.json   results and curves (written atomically when the run finishes)
    study.json               the study config + package version
    results.csv, results.md, report.md, fig_*.png

A run is *finished* iff its ``result.json`` exists; it is never redone. Files are
written to a temporary name and ``os.replace``-d into place, so a sweep killed at any
moment (even SIGKILL) leaves either a complete result or none, and a restarted sweep
produces the same table. A run killed mid-way resumes from its last finished epoch
(``checkpoint.pt``) instead of from its start.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Optional

import torch

from . import dist
from .atomic import write_atomic
from .config import StudyConfig, config_json, run_configs, run_label
from .data import load_dataset
from .train import train_run


def package_version() -> str:
    """Version of the installed ``groupnorm`` package ("unknown" when run from source)."""
    try:
        from importlib.metadata import version

        return version("groupnorm")
    except Exception:  # not installed (source checkout)
        try:
            import groupnorm

            return getattr(groupnorm, "__version__", "unknown")
        except Exception:
            return "unknown"


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def machine_info() -> dict:
    """Where the study ran (for the report)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                python=sys.version.split()[0], platform=platform.platform(), processes=dist.world_size(),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                groupnorm=package_version())


def command_line() -> str:
    """How this process was started, e.g. ``groupnorm --preset quick``."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if prog in ("__main__.py", "-c", "-m"):
        prog = "python -m groupnorm"
    return " ".join([prog] + sys.argv[1:])


def default_threads() -> int:
    """Torch threads per process: one core left free, at least 1.

    On a small shared machine, intra-op threads that compete with other processes for
    the same cores slow training down several-fold (measured: 6x on a loaded 2-core
    box), so the default leaves a core to the rest of the system.
    """
    return max(1, (os.cpu_count() or 1) // dist.world_size() - 1)


def run_dir(cfg: StudyConfig, key: str) -> str:
    return os.path.join(cfg.out, "runs", key)


def load_result(cfg: StudyConfig, key: str) -> Optional[dict]:
    """The finished result of run ``key``, or None."""
    p = os.path.join(run_dir(cfg, key), "result.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def run_sweep(cfg: StudyConfig, *, data=None, log=print) -> dict:
    """Run (or resume) the sweep, then write the tables, figures and report.

    Args:
        cfg (StudyConfig): the study.
        data (Dataset, optional): preloaded data (else loaded from ``cfg.data``).
        log (callable): where progress text goes.

    Returns:
        dict: ``runs`` (list of (run config, result)), ``files`` (written outputs), timing.
    """
    from .report import write_outputs

    t_start = time.time()
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    runs = run_configs(cfg)
    is_main = dist.rank() == 0
    if data is None:
        data = load_dataset(cfg.data, train_size=cfg.train_size or None, test_size=cfg.test_size or None,
                            subset_seed=cfg.subset_seed)
    # Decide once, on rank 0, which runs are done, so all processes agree on the work list.
    todo = dist.broadcast_object(list(dict.fromkeys(rc["key"] for rc in runs if load_result(cfg, rc["key"]) is None)))
    if is_main:
        write_json(os.path.join(cfg.out, "study.json"), dict(config=config_json(cfg), version=package_version(),
                                                              machine=machine_info(), data=data.describe(),
                                                              command=command_line()))
        log(f"[groupnorm] {data.describe()}")
        nkeys = len({rc["key"] for rc in runs})
        log(f"[groupnorm] {nkeys} distinct runs ({len(runs)} table cells), {nkeys - len(todo)} already finished "
            f"in {cfg.out}/runs, {len(todo)} to do ({threads} threads x {dist.world_size()} process(es))")
    bar = None
    if cfg.progress and is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="sweep", unit="run", dynamic_ncols=True)
    trained, done_now = 0, set()
    for rc in runs:
        if rc["key"] not in todo or rc["key"] in done_now:
            continue  # finished before, or the same computation already done in this sweep
        done_now.add(rc["key"])
        desc = f"{run_label(rc)} n={rc['per_device_batch']} s={rc['seed']}"
        if is_main:
            write_json(os.path.join(run_dir(cfg, rc["key"]), "config.json"),
                       dict(run=rc, version=package_version(), machine=machine_info()))
        ckpt = os.path.join(run_dir(cfg, rc["key"]), "checkpoint.pt")
        res = train_run(rc, data, progress=cfg.progress, desc=desc, device=cfg.device, checkpoint=ckpt)
        if is_main:
            write_json(os.path.join(run_dir(cfg, rc["key"]), "result.json"),
                       dict(res, key=rc["key"], version=package_version()))
            if os.path.exists(ckpt):  # the result is saved: the checkpoint has served
                os.unlink(ckpt)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"last: {desc} err={res['error']:.2f}%")
            else:
                log(f"[groupnorm] {desc}: error {res['error']:.2f}% ({res['time_s']:.0f}s)")
        trained += 1
    if bar is not None:
        bar.close()
    dist.barrier()
    pairs = [(rc, load_result(cfg, rc["key"])) for rc in runs] if is_main else []
    files = {}
    if is_main:
        files = write_outputs(cfg, pairs, data=data, machine=machine_info(), trained=trained,
                              wall_s=time.time() - t_start)
    return dict(runs=pairs, files=files, trained=trained, wall_s=time.time() - t_start)


def report_only(cfg: StudyConfig, log=print) -> dict:
    """Rebuild tables/figures/report from the finished runs in ``cfg.out`` (no training)."""
    from .report import write_outputs

    runs = run_configs(cfg)
    pairs = [(rc, load_result(cfg, rc["key"])) for rc in runs]
    missing = sum(r is None for _, r in pairs)
    if missing:
        log(f"[groupnorm] {missing} of {len(pairs)} runs not finished yet; they are left out")
    pairs = [(rc, r) for rc, r in pairs if r is not None]
    return dict(runs=pairs, files=write_outputs(cfg, pairs, data=None, machine=machine_info(), trained=0,
                                                wall_s=None))
