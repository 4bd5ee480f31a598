"""DDP with 2 gloo processes on localhost == ghost batches in one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from groupnorm.study.config import make_config, run_configs
from groupnorm.study.data import load_dataset
from groupnorm.study.norms import GhostBatchNorm
from groupnorm.study.train import train_run
from groupnorm.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r'''
import json, os, sys
import torch
import torch.distributed as td
from torch import nn
torch.set_num_threads(1)
from groupnorm.study import dist
from groupnorm.study.config import make_config, run_configs
from groupnorm.study.data import load_dataset
from groupnorm.study.norms import GhostBatchNorm
from groupnorm.study.train import train_run

assert dist.init_from_env() and td.get_backend() == "gloo"
rank, out = dist.rank(), sys.argv[2]
data = load_dataset(sys.argv[1])

# 1. one BN layer, real per-process statistics vs ghost statistics of the same split
torch.manual_seed(0)
x = torch.randn(8, 3, 5, 5) * 2 + 1          # the same global batch on both processes
bn = nn.BatchNorm2d(3)
y = bn(x[rank * 4:(rank + 1) * 4])           # this process's device: 4 samples
ys = [torch.empty_like(y) for _ in range(2)]
td.all_gather(ys, y.contiguous())
rm, rv = bn.running_mean.clone(), bn.running_var.clone()
td.all_reduce(rm); td.all_reduce(rv)
res = dict(y=torch.cat(ys).tolist(), rm=(rm / 2).tolist(), rv=(rv / 2).tolist())

# 2. whole training runs: bn (per-process statistics) and syncbn
for norm in ("bn", "syncbn"):
    cfg = make_config(data=sys.argv[1], model="resnet", depth=8, width=1, norms=[norm], batch_sizes=[4],
                      seeds=[0], total_batch=8, epochs=1, median_last=1, progress=False)
    rc = run_configs(cfg)[0]
    r = train_run(rc, data, max_steps=3, keep_model=True)
    res[norm] = {k: v.tolist() for k, v in r.pop("model").state_dict().items()}
    res[norm + "_curve"] = r["curve"]

# 3. resume under DDP: a 2-epoch run leaves its epoch-1 checkpoint (written by rank 0); a
#    second call resumes from it (rank 0 reads, broadcasts) and must end where the first did
cfg = make_config(data=sys.argv[1], model="plain", widths=[4, 8], norms=["bn"], batch_sizes=[4], seeds=[0],
                  total_batch=8, epochs=2, median_last=1, progress=False)
rc = run_configs(cfg)[0]
ckpt = os.path.join(os.path.dirname(out), "ckpt.pt")
full = train_run(rc, data, keep_model=True, checkpoint=ckpt)
td.barrier()
shuffles, real_randperm = [], torch.randperm
torch.randperm = lambda *a, **k: shuffles.append(1) or real_randperm(*a, **k)  # one per epoch trained
resumed = train_run(rc, data, keep_model=True, checkpoint=ckpt)
torch.randperm = real_randperm
counts = [None, None]
td.all_gather_object(counts, len(shuffles))
res["resume_epochs_trained"] = counts  # both processes resumed: 1 epoch left each
strip = lambda c: [{k: v for k, v in e.items() if k != "time_s"} for e in c]
res["resume_same_curve"] = strip(full["curve"]) == strip(resumed["curve"])
res["resume_same_model"] = all(torch.equal(a, b) for a, b in zip(full["model"].state_dict().values(),
                                                                 resumed["model"].state_dict().values()))
res["resume_ckpt_epoch"] = torch.load(ckpt, weights_only=False)["epoch"] if rank == 0 else None
if rank == 0:
    with open(out, "w") as f:
        json.dump(res, f)
td.destroy_process_group()
'''


def _write_npz(tmp_path, seed: int, hw: int) -> str:
    """64 training images in 4 classes (class shifts the mean), the first 16 as the test set."""
    rng = np.random.default_rng(seed)
    y = np.arange(64) % 4
    x = rng.normal(size=(64, hw, hw)).astype(np.float32) + y[:, None, None]
    path = str(tmp_path / "d.npz")
    np.savez(path, x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
    return path


def test_two_gloo_processes_match_ghost_batches(tmp_path):
    data_path = _write_npz(tmp_path, seed=0, hw=8)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = str(tmp_path / "ddp.json")
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(script), data_path, out], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP workers timed out")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    with open(out) as f:
        res = json.load(f)

    # 1. ghost BN over the concatenated batch == per-process BN (outputs and mean running stats)
    torch.manual_seed(0)
    xb = torch.randn(8, 3, 5, 5) * 2 + 1
    g = GhostBatchNorm(3, ghost_size=4)
    torch.testing.assert_close(g(xb), torch.tensor(res["y"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.running_mean, torch.tensor(res["rm"]))
    torch.testing.assert_close(g.running_var, torch.tensor(res["rv"]))

    # 2. training: one process with 2 ghosts of 4 == 2 processes of 4 (weights and BN buffers);
    #    syncbn across processes == BN over the whole step in one process
    torch.set_num_threads(1)
    data = load_dataset(data_path)
    for norm in ("bn", "syncbn"):
        cfg = make_config(data=data_path, model="resnet", depth=8, width=1, norms=[norm], batch_sizes=[4],
                          seeds=[0], total_batch=8, epochs=1, median_last=1, progress=False)
        rc = run_configs(cfg)[0]
        assert rc["ghosts"] == 2
        r = train_run(rc, data, max_steps=3, keep_model=True)
        sd = r["model"].state_dict()
        assert set(sd) == set(res[norm])
        for k, v in sd.items():
            torch.testing.assert_close(v.to(torch.float64), torch.tensor(res[norm][k], dtype=torch.float64),
                                       atol=2e-5, rtol=1e-4, msg=f"{norm}: {k}")
    # the two set-ups really differ (the comparison above can fail)
    bn_rv = [k for k in res["bn"] if k.endswith("running_var")][0]
    assert not np.allclose(res["bn"][bn_rv], res["syncbn"][bn_rv])
    # 3. a run resumed from its checkpoint under DDP ends bitwise where the full run ended
    assert res["resume_ckpt_epoch"] == 1 and res["resume_epochs_trained"] == [1, 1]
    assert res["resume_same_curve"] and res["resume_same_model"]


def test_torchrun_cli_sweep(tmp_path):
    """`torchrun --nproc_per_node 2 -m groupnorm ...` runs the sweep; rank 0 writes the outputs."""
    data_path = _write_npz(tmp_path, seed=1, hw=6)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "groupnorm", "--data", data_path, "--widths", "4",
           "--norms", "bn", "syncbn", "--batch-sizes", "4", "2", "--seeds", "0", "--total-batch", "8",
           "--epochs", "1", "--median-last", "1", "--no-progress", "--out", str(out)]
    p = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| bn |" in p.stdout and p.stdout.count("| bn |") == 1  # printed once, by rank 0
    report = (out / "report.md").read_text()
    assert "2 process(es)" in report
    with open(out / "study.json") as f:
        assert json.load(f)["machine"]["processes"] == 2
