"""Config dataclass <-> flags, presets, lr scaling, run keys."""

import pytest

from groupnorm.study.config import (PRESETS, StudyConfig, build_parser, config_from_args, make_config,
                                    parse_grouping, run_configs, run_key, scaled_lr, total_batch)
from groupnorm.study.train import lr_at


def test_linear_lr_scaling():
    assert scaled_lr(0.1, 32, 32) == pytest.approx(0.1)
    assert scaled_lr(0.1, 8, 32) == pytest.approx(0.025)
    assert scaled_lr(0.1, 256, 256) == pytest.approx(0.1)
    # the paper: 8 devices x N images, lr 0.1 * N / 32
    cfg = make_config("paper")
    for rc in run_configs(cfg):
        assert rc["total_batch"] == 8 * rc["per_device_batch"]
        assert rc["lr_scaled"] == pytest.approx(0.1 * rc["per_device_batch"] / 32)
    # fixed total batch: lr and steps do not change with the per-device batch
    cfg = make_config("quick")
    assert {round(rc["lr_scaled"], 12) for rc in run_configs(cfg)} == {round(0.1 * cfg.total_batch / 32, 12)}
    with pytest.raises(ValueError, match="positive"):
        scaled_lr(0.1, 0, 32)


def test_warmup_then_cosine():
    peak, total, warm = 0.4, 100, 10
    lrs = [lr_at(s, total, warm, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[9] == pytest.approx(peak)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01 * peak


def test_flags_are_generated_from_the_dataclass_and_override_the_preset():
    p = build_parser()
    flags = {a.option_strings[0] for a in p._actions if a.option_strings}
    for name in StudyConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in flags
    cfg, _ = config_from_args(["--preset", "quick", "--batch-sizes", "8", "2", "--epochs", "3", "--no-wd-norm"])
    assert cfg.batch_sizes == [8, 2] and cfg.epochs == 3 and cfg.wd_norm is False
    assert cfg.train_size == PRESETS["quick"]["train_size"]  # untouched preset values stay
    cfg, _ = config_from_args([])
    assert cfg == StudyConfig()


@pytest.mark.parametrize("kw, match", [
    (dict(norms=["bn", "xn"]), "unknown norm 'xn'"),
    (dict(total_batch=32, batch_sizes=[32, 3]), r"not a multiple of per-device batch\(es\) \[3\]"),
    (dict(model="resnet", depth=9), "6n\\+2"),
    (dict(median_last=9, epochs=4), "median-last"),
    (dict(ablation=["X3"]), "G<n>"),
    (dict(batch_sizes=[0]), "positive"),
])
def test_bad_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        make_config(**kw)
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("fast")


def test_run_keys_identify_computations():
    cfg = make_config(norms=["bn", "gn", "batchrenorm"], batch_sizes=[4, 2], seeds=[0, 1], total_batch=8,
                      ablation=["G1", "C4"], ablation_batch=4)
    runs = run_configs(cfg)
    by = {(r["norm"], r["per_device_batch"], r["seed"], r.get("num_groups"), r.get("group_size")): r["key"]
          for r in runs}
    # bn depends on the per-device batch; gn does not (same total batch -> identical computation)
    assert by[("bn", 4, 0, None, None)] != by[("bn", 2, 0, None, None)]
    assert by[("gn", 4, 0, None, 4)] == by[("gn", 2, 0, None, 4)]
    assert by[("gn", 4, 0, None, 4)] != by[("gn", 4, 1, None, 4)]
    # the ablation entry equal to the main GN setting is not repeated
    assert sum(1 for r in runs if r["norm"] == "gn" and r["per_device_batch"] == 4 and r["seed"] == 0
               and r.get("group_size") == 4) == 1
    assert run_configs(cfg) == runs  # deterministic
    assert run_key(dict(runs[0], lr=0.2)) != runs[0]["key"]
    assert total_batch(make_config(devices=8, total_batch=0), 4) == 32
    assert parse_grouping("G8") == {"num_groups": 8, "group_size": None}
