"""Tiny end-to-end sweeps: outputs hold the logged numbers; resume after SIGKILL."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from groupnorm.cli import main
from groupnorm.study.config import make_config, run_configs
from groupnorm.study.sweep import run_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _npz(tmp_path, n=96, side=8, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, side, side)).astype(np.float32) + y[:, None, None] * 0.7
    p = tmp_path / "tiny.npz"
    np.savez(p, x_train=x, y_train=y, x_test=x[:30], y_test=y[:30])
    return str(p)


def _tiny(tmp_path, out, **kw):
    args = dict(data=_npz(tmp_path), model="plain", widths=[4, 8], norms=["bn", "gn"], batch_sizes=[8, 2],
                seeds=[0, 1], total_batch=8, epochs=2, median_last=1, gn_group_size=2, ablation=["G1", "C1"],
                ablation_batch=8, threads=1, progress=False, out=str(out))
    args.update(kw)
    return make_config(**args)


def test_end_to_end_tables_plots_report_hold_the_logged_numbers(tmp_path):
    cfg = _tiny(tmp_path, tmp_path / "out")
    res = run_sweep(cfg, log=lambda *_: None)
    files = res["files"]
    for k in ("csv", "md", "fig_error", "fig_curves", "report", "ablation"):
        assert os.path.getsize(files[k]) > 0, k
    from PIL import Image

    fig1 = json.loads(Image.open(files["fig_error"]).info["groupnorm-data"])
    fig4 = json.loads(Image.open(files["fig_curves"]).info["groupnorm-data"])
    logged = {}
    for rc in run_configs(cfg):
        d = os.path.join(cfg.out, "runs", rc["key"])
        with open(os.path.join(d, "result.json")) as f:
            r = json.load(f)
        with open(os.path.join(d, "config.json")) as f:
            c = json.load(f)
        assert c["run"]["key"] == rc["key"] and "version" in c
        # the result is the median of the last epochs' logged validation errors
        ends = [p["val_err"] for p in r["curve"] if float(p["epoch"]).is_integer()]
        assert r["error"] == pytest.approx(float(np.median(ends[-cfg.median_last:])))
        logged[(rc["norm"], rc["per_device_batch"], rc["seed"], rc.get("num_groups"), rc.get("group_size"))] = \
            r["error"]
    with open(files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(run_configs(cfg))
    for row in rows:
        key = (row["norm"], int(row["per_device_batch"]), int(row["seed"]),
               int(row["num_groups"]) if row["num_groups"] else None,
               int(row["group_size"]) if row["group_size"] else None)
        assert float(row["error"]) == pytest.approx(logged[key], abs=1e-4)  # CSV keeps 4 decimals
    # the figures plot exactly the logged numbers
    assert sorted(fig1["bn"]["2"]) == pytest.approx(sorted(logged[("bn", 2, s, None, None)] for s in (0, 1)),
                                                    abs=1e-4)
    assert sorted(fig1["gn (2 ch/group)"]["8"]) == pytest.approx(
        sorted(logged[("gn", 8, s, None, 2)] for s in (0, 1)), abs=1e-4)
    with open(os.path.join(cfg.out, "runs", next(rc["key"] for rc in run_configs(cfg) if rc["norm"] == "bn"
                                                 and rc["per_device_batch"] == 8 and rc["seed"] == 0),
                           "result.json")) as f:
        curve = json.load(f)["curve"]
    assert fig4["bn, n=8"]["val_err"] == [c["val_err"] for c in curve]
    md = open(files["md"]).read()
    bn8 = [logged[("bn", 8, s, None, None)] for s in (0, 1)]
    assert f"{np.mean(bn8):.2f} ± {np.std(bn8, ddof=1):.2f}" in md
    assert f"{logged[('bn', 2, 1, None, None)]:.2f}" in md
    rep = open(files["report"]).read()
    assert "fig_error_vs_batch.png" in rep and "Machine:" in rep and "training time" in rep
    assert "G=1" in open(files["ablation"]).read()
    # a second invocation trains nothing and writes the same table
    again = run_sweep(cfg, log=lambda *_: None)
    assert again["trained"] == 0 and open(files["md"]).read() == md


def test_cli_runs_and_prints_the_table(tmp_path, capsys):
    data = _npz(tmp_path)
    out = tmp_path / "cli"
    rc = main(["--data", data, "--widths", "4", "--norms", "gn", "none", "--batch-sizes", "4", "--seeds", "0",
               "--total-batch", "8", "--epochs", "1", "--median-last", "1", "--gn-group-size", "2",
               "--no-progress", "--threads", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| gn (2 ch/group) |" in text and "| none |" in text
    assert os.path.exists(out / "report.md") and os.path.exists(out / "study.json")
    assert main(["--data", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--data", data, "--total-batch", "128", "--batch-sizes", "4", "--norms", "gn", "--seeds", "0",
                 "--no-progress", "--out", str(tmp_path / "big")]) == 2
    assert "smaller than one step of 128" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--data", data, "--device", "cuda", "--out", str(tmp_path / "gpu")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["--batch-sizes", "3", "--out", str(out)]) == 2
    assert "--total-batch 32 is not a multiple of per-device batch(es) [3]" in capsys.readouterr().err
    assert main(["--report-only", "--data", data, "--widths", "4", "--norms", "gn", "none", "--batch-sizes",
                 "4", "--seeds", "0", "--total-batch", "8", "--epochs", "1", "--median-last", "1",
                 "--gn-group-size", "2", "--out", str(out)]) == 0


def test_help_works():
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_sigkilled_sweep_resumes_without_losing_runs_and_gives_same_table(tmp_path):
    data = _npz(tmp_path, n=384, side=10)
    common = ["--data", data, "--widths", "4", "8", "--norms", "bn", "--batch-sizes", "8", "4", "2",
              "--seeds", "0", "1", "--total-batch", "8", "--epochs", "2", "--median-last", "1",
              "--threads", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "groupnorm", *common, "--out", str(killed)], env=env,
                            cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs_dir = killed / "runs"
    deadline = time.time() + 90
    while time.time() < deadline:  # wait until at least one run finished, then kill mid-sweep
        if runs_dir.exists() and any((d / "result.json").exists() for d in runs_dir.iterdir()):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {d.name: (d / "result.json").read_bytes() for d in runs_dir.iterdir() if (d / "result.json").exists()}
    assert 1 <= len(before) < 6, "the kill should land mid-sweep"
    assert main([*common, "--out", str(killed)]) == 0
    after = {d.name: (d / "result.json").read_bytes() for d in runs_dir.iterdir() if (d / "result.json").exists()}
    assert len(after) == 6
    assert all(after[k] == v for k, v in before.items())  # finished runs were not redone
    fresh = tmp_path / "fresh"
    assert main([*common, "--out", str(fresh)]) == 0
    assert (killed / "results.md").read_text() == (fresh / "results.md").read_text()


def test_divergence_is_recorded_not_raised(tmp_path):
    cfg = _tiny(tmp_path, tmp_path / "div", norms=["none"], batch_sizes=[8], seeds=[0], ablation=[], lr=1e6,
                warmup_epochs=0.0)
    res = run_sweep(cfg, log=lambda *_: None)
    (_, r), = res["runs"]
    assert r["diverged"] and r["error"] == 100.0
    assert "diverged" in open(res["files"]["report"]).read()


def test_run_killed_mid_way_resumes_from_its_last_epoch_with_the_same_result(tmp_path, monkeypatch):
    # a run "killed" right after its first end-of-epoch checkpoint resumes from epoch 1 and
    # ends exactly where an uninterrupted run ends (same curve, same error, same weights);
    # without the checkpoint it would start again from epoch 0
    from groupnorm.study import train as T
    from groupnorm.study.data import load_dataset

    cfg = _tiny(tmp_path, tmp_path / "o", norms=["bn"], batch_sizes=[4], seeds=[0], ablation=[], epochs=3)
    rc = next(r for r in run_configs(cfg))
    data = load_dataset(cfg.data)
    torch.set_num_threads(1)
    ref = T.train_run(rc, data, keep_model=True)

    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    real_save = T.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt("killed after epoch 1")

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        T.train_run(rc, data, checkpoint=ckpt)
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1

    started = []
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: started.append(1) or real_randperm(*a, **k))
    res = T.train_run(rc, data, checkpoint=ckpt, keep_model=True)
    assert len(started) == 2, "resumed at epoch 1 of 3 (two epochs left to shuffle)"
    strip = lambda c: [{k: v for k, v in e.items() if k != "time_s"} for e in c]  # noqa: E731
    assert strip(res["curve"]) == strip(ref["curve"]) and res["error"] == ref["error"]
    assert res["steps"] == ref["steps"]
    for a, b in zip(res["model"].state_dict().values(), ref["model"].state_dict().values()):
        assert torch.equal(a, b)
    # a checkpoint of another run is ignored (training starts afresh)
    assert T.load_checkpoint(ckpt, "another-key") is None


def test_sweep_deletes_checkpoints_of_finished_runs(tmp_path):
    cfg = _tiny(tmp_path, tmp_path / "o", norms=["gn"], batch_sizes=[8], seeds=[0], ablation=[], epochs=2)
    run_sweep(cfg, log=lambda *_: None)
    runs = list((tmp_path / "o" / "runs").iterdir())
    assert runs and all((d / "result.json").exists() and not (d / "checkpoint.pt").exists() for d in runs)
