"""The ``groupnorm`` command: the batch-size study (BN vs GN) from one command.

Examples::

    groupnorm --preset quick                      # the README's main command (~10 min on 2 CPU cores)
    groupnorm --preset quick --data cifar-10-batches-py --model resnet --depth 8
    groupnorm --preset paper                      # the paper's protocol at full length (GPU)
    torchrun --nproc_per_node 2 -m groupnorm --preset quick --out study_out/ddp
"""

from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    """Entry point of ``groupnorm`` / ``python -m groupnorm``. Returns the exit status."""
    from .study import dist
    from .study.config import config_from_args, run_configs
    from .study.data import DatasetError
    from .study.norms import NORMS

    try:
        cfg, ns = config_from_args(argv)
    except ValueError as e:
        print(f"groupnorm: error: {e}", file=sys.stderr)
        return 2
    if ns.list_norms:
        from .study.norms import DESCRIPTIONS

        for name, f in NORMS.items():
            print(f"{name:12s} {DESCRIPTIONS.get(name, getattr(f, '__name__', repr(f)))}")
        return 0
    if ns.dry_run:
        from .study.config import run_label
        from .study.sweep import load_result

        for rc in run_configs(cfg):
            done = "done" if load_result(cfg, rc["key"]) else "todo"
            print(f"{rc['key']} {done} {run_label(rc):22s} per-device {rc['per_device_batch']:3d} "
                  f"total {rc['total_batch']:4d} lr {rc['lr_scaled']:.4g} seed {rc['seed']}")
        return 0
    from .study.sweep import report_only, run_sweep

    finished = False
    try:
        try:
            dist.init_from_env(cfg.device)
            out = report_only(cfg) if ns.report_only else run_sweep(cfg)
        except (DatasetError, ValueError) as e:  # bad data or settings: the message names values and fix
            print(f"groupnorm: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ngroupnorm: interrupted; finished runs are kept, rerun the same command to resume",
                  file=sys.stderr)
            return 130
        if dist.rank() == 0:
            with open(out["files"]["md"]) as f:
                print(f.read())
            if "ablation" in out["files"]:
                with open(out["files"]["ablation"]) as f:
                    print(f.read())
            print("written: " + ", ".join(out["files"].values()))
        finished = True
        return 0
    finally:
        dist.shutdown(finished)


def run(argv=None) -> int:
    """The console entry point (``groupnorm``, ``python -m groupnorm``): :func:`main`, and in
    a process that torchrun started (``WORLD_SIZE`` > 1) an ``os._exit`` with its status once
    the output is flushed. The work is done and the process group destroyed by then, but
    rarely (three clean-clone CI runs under load over three sessions, with and without a
    barrier before ``destroy_process_group``) a rank aborted in a C++ destructor at
    interpreter exit ("terminate called without an active exception", SIGABRT), and
    torchrun then reported the whole job as failed. ``os._exit`` skips those destructors;
    the results are already on disk (written atomically). Called in-process (tests,
    ``main()``), nothing changes."""
    status = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(run())
