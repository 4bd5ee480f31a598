"""The batch-size study: BatchNorm vs GroupNorm (Wu & He, 2018) on your own machine.

Command line: ``groupnorm --preset quick`` (or ``python -m groupnorm``). Python API::

    from groupnorm.study import make_config, run_study
    out = run_study(make_config("quick", out="my_out"))
    print(open(out["files"]["md"]).read())
"""

from .config import PRESETS, StudyConfig, make_config, run_configs, scaled_lr
from .data import Dataset, DatasetError, load_dataset
from .models import PlainNet, ResNet, build_model
from .norms import NORMS, BatchRenorm, GhostBatchNorm, make_norm, register_norm
from .sweep import report_only, run_sweep
from .train import train_run


def run_study(cfg: StudyConfig = None, **overrides) -> dict:
    """Run (or resume) the sweep of ``cfg`` (or ``make_config(**overrides)``); see run_sweep."""
    if cfg is None:
        cfg = make_config(**overrides)
    return run_sweep(cfg)


__all__ = ["StudyConfig", "PRESETS", "make_config", "run_configs", "scaled_lr", "Dataset", "DatasetError",
           "load_dataset", "PlainNet", "ResNet", "build_model", "NORMS", "GhostBatchNorm", "BatchRenorm",
           "make_norm", "register_norm", "run_sweep", "report_only", "train_run", "run_study"]
