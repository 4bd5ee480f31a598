"""The norm registry and the batch-statistics norms (ghost BN, batch renorm)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groupnorm.study import norms as N
from groupnorm.study.models import build_model


def test_registry_has_every_norm_of_the_study():
    assert {"bn", "syncbn", "batchrenorm", "ln", "in", "gn", "gn+ws", "none"} <= set(N.NORMS)
    for name in N.NORMS:
        m = N.make_norm(name, 8, group_size=4, ghost_size=2)
        assert isinstance(m, nn.Module)
        x = torch.randn(4, 8, 3, 3)
        assert m(x).shape == x.shape


def test_gn_family_uses_the_package_op_and_right_groups():
    from groupnorm import GroupNorm

    for name, opts, groups in [("gn", dict(group_size=4), 4), ("gn", dict(num_groups=2), 2), ("ln", {}, 1),
                               ("in", {}, 16), ("gn+ws", dict(num_groups=8), 8)]:
        m = N.make_norm(name, 16, **opts)
        assert isinstance(m, GroupNorm), (name, type(m))
        x = torch.randn(3, 16, 5, 5)
        ref = F.group_norm(x, groups, m.weight, m.bias, 1e-5)
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-4)


def test_gn_ws_builds_weight_standardized_convs():
    from groupnorm.ws import WSConv2d

    m = build_model("plain", "gn+ws", 1, 10, widths=[8, 8], group_size=4)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert convs and all(isinstance(c, WSConv2d) for c in convs)
    m = build_model("plain", "gn", 1, 10, widths=[8, 8], group_size=4)
    assert not any(isinstance(c, WSConv2d) for c in m.modules())


def test_callable_and_registered_norms():
    calls = []

    def mine(c, **opts):
        calls.append((c, opts["dims"]))
        return nn.GroupNorm(1, c)

    m = build_model("plain", mine, 1, 10, widths=[4, 8])
    assert calls == [(4, 2), (8, 2)] and m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    N.register_norm("test_mine", mine, overwrite=True)
    try:
        assert N.resolve_norm("test_mine") is mine
        with pytest.raises(ValueError, match="already registered"):
            N.register_norm("test_mine", mine)
    finally:
        N.NORMS.pop("test_mine")
    with pytest.raises(ValueError, match="unknown norm 'nope'.*registered"):
        N.resolve_norm("nope")


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_ghost_bn_equals_bn_per_micro_batch(g):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    m = N.GhostBatchNorm(3, ghost_size=g)
    nn.init.normal_(m.weight)
    nn.init.normal_(m.bias)
    y = m(x)
    refs, rm, rv = [], torch.zeros(3), torch.zeros(3)
    for k in range(0, 8, g):
        bn = nn.BatchNorm2d(3)
        bn.load_state_dict({**bn.state_dict(), "weight": m.weight.detach(), "bias": m.bias.detach()})
        refs.append(bn(x[k:k + g]))
        rm, rv = rm + bn.running_mean, rv + bn.running_var
    torch.testing.assert_close(y, torch.cat(refs), atol=1e-5, rtol=1e-5)
    # running stats = average of the per-device running buffers
    torch.testing.assert_close(m.running_mean, rm / (8 // g))
    torch.testing.assert_close(m.running_var, rv / (8 // g))


def test_ghost_bn_single_value_per_channel_does_not_crash():
    m = N.GhostBatchNorm(4, ghost_size=1)
    nn.init.normal_(m.bias)
    y = m(torch.randn(6, 4, 1, 1))  # torch's BN raises here
    torch.testing.assert_close(y, m.bias.detach().view(1, 4, 1, 1).expand(6, 4, 1, 1))
    assert torch.isfinite(m.running_var).all()
    y = N.GhostBatchNorm(4)(torch.randn(1, 4, 1, 1))
    assert torch.isfinite(y).all()


def test_ghost_bn_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible by the per-device"):
        N.GhostBatchNorm(2, ghost_size=3)(torch.randn(8, 2, 2, 2))


def test_batch_renorm_matches_formula_and_reduces_to_bn():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 2 + 0.5
    # rmax=1, dmax=0: r=1, d=0 -> plain (ghost) batch norm in training
    br = N.BatchRenorm(3, ghost_size=4, rmax=1.0, dmax=0.0)
    gb = N.GhostBatchNorm(3, ghost_size=4)
    torch.testing.assert_close(br(x), gb(x), atol=1e-5, rtol=1e-5)
    # with running stats far away, r and d are clipped at rmax / dmax
    br = N.BatchRenorm(3, rmax=2.0, dmax=0.5)
    br.running_mean.fill_(10.0)
    br.running_var.fill_(100.0)
    y = br(x)
    mu = x.mean((0, 2, 3), keepdim=True)
    sd = (x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    r = (sd / (100.0 + 1e-5) ** 0.5).clamp(0.5, 2.0)
    d = ((mu - 10.0) / (100.0 + 1e-5) ** 0.5).clamp(-0.5, 0.5)
    torch.testing.assert_close(y, (x - mu) / sd * r + d, atol=1e-5, rtol=1e-5)
    assert (d == -0.5).all()  # the clip was active
    # ramp: at step 0 of a warmup, rmax=1 and dmax=0
    br = N.BatchRenorm(3, warmup_steps=10)
    assert br.current_limits() == (1.0, 0.0)
    br.eval()
    torch.testing.assert_close(br(x), F.batch_norm(x, br.running_mean, br.running_var, br.weight, br.bias))


def test_set_ghost_size_leaves_syncbn_alone():
    m = build_model("plain", "syncbn", 1, 10, widths=[4], ghost_size=2)
    N.set_ghost_size(m, 1)
    assert all(b.ghost_size is None for b in m.modules() if isinstance(b, N.GhostBatchNorm))
    m = build_model("plain", "bn", 1, 10, widths=[4], ghost_size=2)
    N.set_ghost_size(m, 1)
    assert all(b.ghost_size == 1 for b in m.modules() if isinstance(b, N.GhostBatchNorm))
