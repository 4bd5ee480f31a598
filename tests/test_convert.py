"""Model surgery: BN -> GN (``convert``), GN -> BN, torch GN (+act) -> fused GN, conv -> WS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _integration_models import Tiny3DNet, TinyResNet, UNetResBlock, count
from groupnorm import GroupNorm, group_norm
from groupnorm._validate import divisors
from groupnorm.conversion import (
    BatchNormAct2d,
    ConversionReport,
    choose_groups,
    convert,
    convert_to_batchnorm,
    convert_ws,
    fuse,
)
from groupnorm.ws import WSConv1d, WSConv2d, WSConv3d, standardize_weight

BN = nn.modules.batchnorm._BatchNorm


def _randomize_affine(model: nn.Module) -> None:
    """Non-trivial affine params so that "reused" and "same output" checks can fail."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "weight", None) is not None and isinstance(m, (BN, nn.GroupNorm, GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))


# ---------------------------------------------------------------- the group-count rule

@pytest.mark.parametrize("C, G, want", [
    (64, 32, 32),   # divisible: as asked
    (30, 32, 30),   # C < G: largest divisor of C not above G is C itself (InstanceNorm)
    (48, 32, 24),   # not divisible: largest divisor below 32
    (31, 32, 31),   # prime C below G: G = C
    (37, 32, 1),    # prime C above G: only 1 divides -> LayerNorm-like
    (1, 32, 1),     # C = 1
    (6, 4, 3),
])
def test_choose_groups_num_groups_rule(C, G, want):
    assert choose_groups(C, G) == want


@pytest.mark.parametrize("C, S, want", [
    (64, 16, 4),    # divisible
    (48, 20, 2),    # smallest divisor of 48 >= 20 is 24 -> 2 groups (groups never smaller than asked)
    (7, 2, 1),      # prime C: the only group size >= 2 is 7
    (8, 100, 1),    # S > C: one group
    (1, 1, 1),      # C = 1
])
def test_choose_groups_group_size_rule(C, S, want):
    assert choose_groups(C, group_size=S) == want


@settings(max_examples=200, deadline=None)
@given(C=st.integers(1, 600), G=st.integers(1, 64))
def test_choose_groups_is_the_largest_divisor_not_above(C, G):
    got = choose_groups(C, G)
    assert C % got == 0 and got <= G
    assert all(d <= got for d in divisors(C) if d <= G)


def test_choose_groups_strict_and_bad_args():
    assert choose_groups(64, 32, fallback="error") == 32
    with pytest.raises(ValueError, match="valid num_groups for C=30"):  # the package's message
        choose_groups(30, 32, fallback="error")
    with pytest.raises(ValueError, match="fallback"):
        choose_groups(30, 32, fallback="nearest")
    with pytest.raises(ValueError, match="positive"):
        choose_groups(30, 0)
    with pytest.raises(ValueError, match="exactly one"):
        choose_groups(30, 2, 3)


# ---------------------------------------------------------------- BN -> GN

def test_convert_resnet_replaces_every_bn_and_reuses_parameters():
    torch.manual_seed(0)
    model = TinyResNet()
    _randomize_affine(model)
    n_bn = count(model, BN)
    names = [n for n, m in model.named_modules() if isinstance(m, BN)]
    params = {n: (m.weight, m.bias) for n, m in model.named_modules() if isinstance(m, BN)}
    n_params = sum(p.numel() for p in model.parameters())

    report = convert(model, num_groups=4)
    assert isinstance(report, ConversionReport) and report.model is model  # in place
    assert len(report) == n_bn == 6 and count(model, BN) == 0 and count(model, GroupNorm) == n_bn
    assert sorted(report.paths) == sorted(names)  # e.g. "layer2.0.downsample.1"
    for r in report.replaced:
        gn = model.get_submodule(r.path)
        assert (r.source, r.target, r.num_channels, r.num_groups) == ("BatchNorm2d", "GroupNorm", gn.num_channels, 4)
        assert gn.weight is params[r.path][0] and gn.bias is params[r.path][1]  # same Parameters
        assert "running stats dropped" in r.note
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert "layer2.0.downsample.1: BatchNorm2d -> GroupNorm (C=16, G=4)" in str(report)
    # the new module computes GroupNorm with the kept affine
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(model.layer1[0].bn1(x), F.group_norm(x, 4, params["layer1.0.bn1"][0], params["layer1.0.bn1"][1]))
    y = model(torch.randn(2, 3, 16, 16))
    y.sum().backward()
    assert y.shape == (2, 10) and model.layer1[0].bn1.weight.grad is not None


def test_convert_default_num_groups_is_32_and_group_size():
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.BatchNorm2d(64), nn.BatchNorm2d(48))
    report = convert(model)
    assert [r.num_groups for r in report.replaced] == [32, 24]
    assert "C=48 does not fit num_groups=32; used G=24" in report.replaced[1].note
    assert report.replaced[0].note == "running stats dropped"  # divisible: nothing adapted
    model = nn.Sequential(nn.BatchNorm2d(64), nn.BatchNorm2d(48))
    assert [r.num_groups for r in convert(model, group_size=16).replaced] == [4, 3]
    with pytest.raises(ValueError, match="not both"):
        convert(model, 32, group_size=16)


@pytest.mark.parametrize("C", [1, 7, 31])  # C of 1 and primes
def test_convert_prime_and_one_channel(C):
    model = nn.Sequential(nn.BatchNorm1d(C))
    report = convert(model, num_groups=4)
    gn = model[0]
    assert isinstance(gn, GroupNorm) and gn.num_groups == 1 and gn.num_channels == C
    assert report.replaced[0].num_groups == 1
    y = model(torch.randn(3, C, 5))  # (N, C, L) input of a BatchNorm1d
    assert torch.isfinite(y).all()


def test_convert_fallback_error_names_the_module():
    model = nn.Sequential(nn.Conv2d(3, 30, 1), nn.Sequential(nn.BatchNorm2d(30)))
    with pytest.raises(ValueError, match=r"1\.0 \(BatchNorm2d\(30\)\).*valid num_groups for C=30"):
        convert(model, 32, fallback="error")
    assert isinstance(model[1][0], nn.BatchNorm2d)  # the failing module was not replaced


def test_convert_no_affine_and_no_running_stats():
    bn_plain = nn.BatchNorm2d(8, affine=False)                    # affine=False -> GN without params
    bn_nostats = nn.BatchNorm2d(8, track_running_stats=False)     # no running stats to drop
    model = nn.Sequential(bn_plain, bn_nostats)
    report = convert(model, 2)
    assert model[0].weight is None and model[0].bias is None and not model[0].affine
    assert model[1].affine and model[1].weight is bn_nostats.weight
    assert report.replaced[1].note == ""
    assert len(list(model.parameters())) == 2
    # affine=True forces fresh ones/zeros on a BN that had none
    model = nn.Sequential(nn.BatchNorm2d(8, affine=False))
    report = convert(model, 2, affine=True)
    assert torch.equal(model[0].weight, torch.ones(8)) and torch.equal(model[0].bias, torch.zeros(8))
    assert "new weight=1, bias=0" in report.replaced[0].note
    # affine=False drops the BN's params
    model = nn.Sequential(nn.BatchNorm2d(8))
    assert "affine dropped" in convert(model, 2, affine=False).replaced[0].note and model[0].weight is None


def test_convert_keeps_eps_or_overrides():
    model = nn.Sequential(nn.BatchNorm2d(8, eps=1e-3), nn.BatchNorm2d(8))
    convert(model, 2)
    assert model[0].eps == 1e-3 and model[1].eps == 1e-5
    model = nn.Sequential(nn.BatchNorm2d(8, eps=1e-3))
    convert(model, 2, eps=1e-6)
    assert model[0].eps == 1e-6


def test_convert_containers_modulelist_moduledict_nested_sequential():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.BatchNorm2d(4), nn.Sequential(nn.Sequential(nn.BatchNorm2d(6)))])
    model.heads = nn.ModuleDict({"a": nn.BatchNorm1d(10), "b": nn.Linear(2, 2)})
    report = convert(model, 2)
    assert sorted(report.paths) == ["blocks.0", "blocks.1.0.0", "heads.a"]
    assert isinstance(model.blocks[0], GroupNorm) and isinstance(model.blocks[1][0][0], GroupNorm)
    assert isinstance(model.heads["a"], GroupNorm) and isinstance(model.heads["b"], nn.Linear)


def test_convert_shared_bn_stays_one_gn():
    shared = nn.BatchNorm2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), shared, nn.Conv2d(8, 8, 1), shared, nn.ModuleList([shared]))
    report = convert(model, 4)
    assert len(report) == 1  # one instance replaced ...
    assert model[1] is model[3] is model[4][0] and isinstance(model[1], GroupNorm)  # ... used thrice
    assert report.replaced[0].path == "1" and report.replaced[0].aliases == ["3", "4.0"]
    assert sorted(report.paths) == ["1", "3", "4.0"]
    assert "shared, also at 3, 4.0" in str(report)
    assert len(list(model.parameters())) == 2 + 2 + 2  # two convs (w, b) + one GN (w, b)


def test_convert_shared_subtree_walked_once():
    # the same block (containing a BN) used twice: its BN is replaced once, both uses see it
    block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model = nn.Sequential(block, block)
    report = convert(model, 2)
    assert len(report) == 1 and model[0] is model[1] and isinstance(model[0][1], GroupNorm)


def test_convert_model_without_bn_reports_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.GroupNorm(2, 4), nn.LayerNorm(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    children = list(model.children())
    report = convert(model)
    assert not report and len(report) == 0 and report.model is model
    assert "no BatchNorm modules found; the model is unchanged" in str(report)
    assert list(model.children()) == children
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_convert_root_module_is_a_bn():
    bn = nn.BatchNorm3d(6)
    report = convert(bn, 3)
    assert isinstance(report.model, GroupNorm) and report.replaced[0].path == ""
    assert "<root>: BatchNorm3d -> GroupNorm" in str(report)


def test_convert_not_inplace_leaves_original():
    model = TinyResNet()
    report = convert(model, 4, inplace=False)
    assert report.model is not model and count(model, BN) == 6 and count(report.model, BN) == 0


def test_convert_keeps_dtype_device_requires_grad_and_mode():
    model = nn.Sequential(nn.BatchNorm2d(8), nn.BatchNorm2d(8, affine=False), nn.BatchNorm2d(8)).double()
    model[0].weight.requires_grad_(False)  # frozen BN stays frozen
    model[0].eval()
    model[2].train()
    convert(model, 2)
    assert model[0].weight.dtype == torch.float64 and not model[0].weight.requires_grad
    assert not model[0].training and model[1].training and model[2].training
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    assert model(x).dtype == torch.float64
    # a BN without params takes the dtype of its running stats (used for GN params if forced)
    model = nn.Sequential(nn.BatchNorm2d(8, affine=False).half())
    convert(model, 2, affine=True)
    assert model[0].weight.dtype == torch.float16
    # meta device (no storage) stays on meta
    model = nn.Sequential(nn.BatchNorm2d(8, device="meta"))
    convert(model, 2)
    assert model[0].weight.device.type == "meta"


def test_convert_syncbn_and_lazy_bn():
    model = nn.Sequential(nn.SyncBatchNorm(8), nn.LazyBatchNorm2d())
    report = convert(model, 4)
    assert isinstance(model[0], GroupNorm) and report.replaced[0].source == "SyncBatchNorm"
    # an uninitialised lazy BN has no C yet: skipped, said so
    assert isinstance(model[1], nn.LazyBatchNorm2d)
    assert report.skipped and "uninitialised" in report.skipped[0][1] and "skipped 1" in str(report)
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    lazy(torch.randn(2, 6, 3, 3))  # materialises (now a BatchNorm2d(6))
    assert convert(lazy, 4).replaced[0].num_groups == 3


def test_convert_3d_net():
    torch.manual_seed(0)
    model = Tiny3DNet()
    report = convert(model, 4)
    assert [(r.source, r.num_channels, r.num_groups) for r in report.replaced] == [
        ("BatchNorm3d", 6, 3), ("BatchNorm3d", 12, 4), ("BatchNorm1d", 5, 1)]
    model.train()
    y = model(torch.randn(1, 2, 4, 4, 4))  # batch of 1 in train mode: BN would raise here, GN does not
    assert y.shape == (1, 5) and torch.isfinite(y).all()


def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        convert(lambda x: x)


# ---------------------------------------------------------------- GN -> BN

def test_convert_to_batchnorm_roundtrip_on_resnet():
    model = TinyResNet()
    convert(model, 4)
    weights = [m.weight for m in model.modules() if isinstance(m, GroupNorm)]
    report = convert_to_batchnorm(model, example_inputs=torch.randn(2, 3, 16, 16))
    assert len(report) == 6 and count(model, GroupNorm) == 0 and count(model, BatchNormAct2d) == 6
    assert [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == weights
    assert report.replaced[0].note == "was G=4"
    model.eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_convert_to_batchnorm_dims_and_torch_gn():
    model = nn.Sequential(nn.GroupNorm(2, 4), GroupNorm(2, 4, activation="silu"))
    convert_to_batchnorm(model, dim=3)
    assert type(model[0]) is nn.BatchNorm3d  # torch GN -> plain BN
    assert model[1].activation == "silu" and isinstance(model[1], nn.BatchNorm3d)
    # ranks from a forward pass: (N, C) and (N, C, L) -> 1d, 5-D -> 3d
    m1 = nn.Sequential(GroupNorm(1, 4))
    convert_to_batchnorm(m1, example_inputs=(torch.randn(3, 4),))
    assert isinstance(m1[0], nn.BatchNorm1d)
    m3 = nn.Sequential(GroupNorm(1, 4))
    convert_to_batchnorm(m3, example_inputs={"input": torch.randn(2, 4, 2, 2, 2)})
    assert isinstance(m3[0], nn.BatchNorm3d)


def test_convert_to_batchnorm_keeps_residual_activation_semantics():
    gn = GroupNorm(2, 4, activation="relu", affine=False)
    model = nn.Sequential(gn)
    convert_to_batchnorm(model, dim=2, track_running_stats=False)
    bn = model[0]
    x, r = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    y, s = bn(x, residual=r, return_sum=True)  # the GroupNorm call signature still works
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, F.relu(F.batch_norm(x + r, None, None, training=True)))
    with pytest.raises(ValueError, match="return_sum"):
        bn(x, return_sum=True)


def test_convert_to_batchnorm_bad_input():
    model = nn.Sequential(GroupNorm(2, 4), GroupNorm(2, 4))
    with pytest.raises(ValueError, match="exactly one of dim"):
        convert_to_batchnorm(model)
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        convert_to_batchnorm(model, dim=4)
    # a shared GN seeing 2-D and 4-D inputs has no single BatchNorm: ask for dim
    shared = GroupNorm(2, 4)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = shared

        def forward(self, x):
            return self.n(x).mean(), self.n(x.flatten(2).mean(-1))

    with pytest.raises(ValueError, match="different ranks"):
        convert_to_batchnorm(Two(), example_inputs=torch.randn(2, 4, 3, 3))
    # a GN not called by the example pass is skipped and reported
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = GroupNorm(2, 4), GroupNorm(2, 4)

        def forward(self, x):
            return self.used(x)

    m = Unused()
    report = convert_to_batchnorm(m, example_inputs=torch.randn(2, 4, 3))
    assert isinstance(m.used, nn.BatchNorm1d) and isinstance(m.unused, GroupNorm)
    assert report.skipped == [("unused", "not called by the example forward pass; input rank unknown")]


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d as torchvision writes it (weight, bias and the
    running statistics are buffers); torchvision is not a dependency."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


def test_convert_frozen_batchnorm_of_detection_backbones():
    # detection backbones (torchvision, detectron2) use FrozenBatchNorm2d; the paper's
    # detection models replace it by GN, trained: weight/bias start from the frozen values
    fbn = FrozenBatchNorm2d(64, eps=1e-3)
    fbn.weight.uniform_(0.5, 1.5)
    fbn.bias.normal_()
    model = nn.Sequential(nn.Conv2d(3, 64, 3), fbn, nn.ReLU(), nn.Conv2d(64, 48, 1), FrozenBatchNorm2d(48))
    report = convert(model, num_groups=32)
    gn1, gn2 = model[1], model[4]
    assert type(gn1) is GroupNorm and (gn1.num_groups, gn1.eps) == (32, 1e-3) and gn2.num_groups == 24
    assert gn1.weight.requires_grad and torch.equal(gn1.weight.detach(), fbn.weight)
    assert torch.equal(gn1.bias.detach(), fbn.bias)
    assert [r.source for r in report.replaced] == ["FrozenBatchNorm2d"] * 2
    assert "frozen running stats dropped" in report.replaced[0].note
    x = torch.randn(2, 3, 8, 8)
    h = model[0](x)
    torch.testing.assert_close(gn1(h), F.group_norm(h, 32, fbn.weight, fbn.bias, eps=1e-3), rtol=1e-5, atol=1e-5)
    assert not convert(nn.Sequential(FrozenBatchNorm2d(8)), num_groups=4, affine=False).model[0].affine


# ---------------------------------------------------------------- torch GN (+ act) -> fused

@pytest.mark.parametrize("act_mod, act", [(nn.SiLU(), "silu"), (nn.GELU(), "gelu"), (nn.ReLU(inplace=True), "relu")])
def test_fuse_gn_activation_in_sequential_same_outputs(act_mod, act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), act_mod, nn.Conv2d(8, 4, 1))
    _randomize_affine(model)
    x = torch.randn(2, 3, 7, 7)
    ref = model(x)
    keys = list(model.state_dict())
    report = fuse(model)
    assert isinstance(model[1], GroupNorm) and model[1].activation == act and isinstance(model[2], nn.Identity)
    assert report.replaced[0].target == f"GroupNorm(activation={act!r})" and "fused 2" in report.replaced[0].note
    assert list(model.state_dict()) == keys  # checkpoints load unchanged
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_fuse_unet_block_same_outputs_and_grads():
    torch.manual_seed(0)
    block = UNetResBlock(8, 16)
    _randomize_affine(block)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    ref = block(x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    report = fuse(block)
    assert len(report) == 2 and all(r.target == "GroupNorm(activation='silu')" for r in report.replaced)
    out = block(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)


def test_fuse_what_is_not_fused():
    shared = nn.GroupNorm(2, 8)
    model = nn.Sequential(
        nn.GroupNorm(2, 8), nn.GELU(approximate="tanh"),  # tanh GELU: not the op's exact GELU
        shared, nn.SiLU(),                                 # shared GN: its other use wants no SiLU
        shared,
        GroupNorm(2, 8, activation="relu"), nn.SiLU(),     # already has an activation
        nn.GroupNorm(2, 8, affine=False, bias=False),      # no following activation
    )
    x = torch.randn(2, 8, 3, 3)
    ref = model(x)
    report = fuse(model)
    assert isinstance(model[1], nn.GELU) and isinstance(model[3], nn.SiLU) and isinstance(model[6], nn.SiLU)
    assert model[2] is model[4] and isinstance(model[2], GroupNorm) and model[2].activation is None
    assert any("shared GroupNorm not fused" in why for _, why in report.skipped)
    assert not model[7].affine
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    # activations=False: only the module swap
    m = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU())
    fuse(m, activations=False)
    assert isinstance(m[1], nn.SiLU) and m[0].activation is None


class _FnActBlock(nn.Module):
    """Activations applied in forward code, the way diffusion UNets write their blocks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm1, self.norm2, self.norm3 = nn.GroupNorm(4, 8), nn.GroupNorm(2, 8), GroupNorm(2, 8)
        self.norm4, self.norm5 = nn.GroupNorm(4, 8), nn.GroupNorm(2, 8)
        self.act = nn.SiLU()  # shared: also applied to the time embedding

    def forward(self, x, temb):
        h = F.silu(self.norm1(self.conv(x)))          # functional SiLU            -> fused
        h = self.act(self.norm2(h))                   # shared activation module   -> fused
        h = F.gelu(self.norm3(h))                     # our own GroupNorm + exact F.gelu -> fused
        h = self.norm4(h).relu()                      # method call                -> fused
        n5 = self.norm5(h)
        h = F.gelu(n5, approximate="tanh") + n5       # tanh GELU, and a second use: not fused
        return h + self.act(temb)                     # the shared SiLU still applies here


def test_fuse_traced_activation_calls_same_outputs_and_grads():
    model = _FnActBlock()
    x, temb = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    ref = model(x, temb)
    report = fuse(model, trace=True)
    gm = report.model
    assert isinstance(gm, torch.fx.GraphModule)
    acts = {r.path: r.target for r in report.replaced}
    assert acts == {"norm1": "GroupNorm(activation='silu')", "norm2": "GroupNorm(activation='silu')",
                    "norm3": "GroupNorm(activation='gelu')", "norm4": "GroupNorm(activation='relu')",
                    "norm5": "GroupNorm"}
    code = gm.code
    assert "silu" not in code and ".relu()" not in code and "approximate = 'tanh'" in code
    assert list(gm.state_dict()) == list(model.state_dict())
    xr = x.clone().requires_grad_()
    out = gm(xr, temb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the traced model itself keeps computing the same thing (its modules were not changed
    # to apply the activation a second time)
    torch.testing.assert_close(model(x, temb), ref, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(out.sum(), [xr])
    x2 = x.clone().requires_grad_()
    (gref,) = torch.autograd.grad(model(x2, temb).sum(), [x2])
    torch.testing.assert_close(gx, gref, rtol=1e-4, atol=1e-5)


def test_fuse_traced_skips_a_groupnorm_called_twice_and_reports_untraceable_models():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(2, 8)

        def forward(self, x):
            return F.silu(self.norm(x)) + self.norm(x * 2)

    model = Twice()
    report = fuse(model, trace=True)
    assert any("called more than once" in why for _, why in report.skipped)
    # nothing fused: the (module-swapped) model itself is returned, no GraphModule
    assert report.model is model and model.norm.activation is None

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(2, 8)

        def forward(self, x):
            return F.silu(self.norm(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace

    with pytest.raises(RuntimeError, match=r"fuse\(trace=True\): torch.fx cannot trace Branchy"):
        fuse(Branchy(), trace=True)


def test_symbolic_trace_of_models_using_groupnorm():
    # torch.fx sees group_norm as one call (module and functional forms, with return_sum)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn = GroupNorm(4, 8, activation="silu")

        def forward(self, x, r):
            y, s = group_norm(self.gn(x), 2, residual=r, return_sum=True)
            return y * s

    m = M()
    gm = torch.fx.symbolic_trace(m)
    x, r = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(gm(x, r), m(x, r))
    assert "group_norm" in gm.code


def test_fuse_gn_without_bias_and_own_gn_followed_by_act():
    model = nn.Sequential(nn.GroupNorm(2, 8, bias=False), nn.ReLU(), GroupNorm(4, 8), nn.SiLU())
    x = torch.randn(2, 8, 3)
    ref = model(x)
    report = fuse(model)
    assert model[0].bias is None and model[0].activation == "relu" and model[2].activation == "silu"
    assert [r.path for r in report.replaced] == ["0", "2"]
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_fuse_without_gn_reports_nothing():
    report = fuse(nn.Sequential(nn.Linear(2, 2), nn.SiLU()))
    assert not report and "no torch.nn.GroupNorm or fusable GroupNorm + activation modules found" in str(report)
    report = convert_ws(nn.Sequential(nn.Linear(2, 2)))
    assert not report and "no Conv1d/Conv2d/Conv3d modules found; the model is unchanged" in str(report)
    report = convert_to_batchnorm(nn.Sequential(nn.Linear(2, 2)), dim=2)
    assert not report and "no GroupNorm modules found" in str(report)


# ---------------------------------------------------------------- conv -> WS conv

def test_convert_ws_resnet_and_3d():
    torch.manual_seed(0)
    model = TinyResNet()
    convert(model, 4)
    convs = {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}
    report = convert_ws(model, eps=1e-6)
    assert len(report) == len(convs) == 6 and count(model, WSConv2d) == 6
    for r in report.replaced:
        new = model.get_submodule(r.path)
        assert new.weight is convs[r.path].weight and new.eps == 1e-6 and new.stride == convs[r.path].stride
    x = torch.randn(2, 8, 6, 6)
    conv = model.layer1[0].conv1
    torch.testing.assert_close(conv(x), F.conv2d(x, standardize_weight(conv.weight, 1e-6), None, 1, 1))
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # GN + WS trains
    assert model.conv1.weight.grad is not None
    net = Tiny3DNet()
    convert_ws(net)
    assert count(net, WSConv3d) == 2 and net(torch.randn(2, 2, 4, 4, 4)).shape == (2, 5)


def test_convert_ws_include_skip_and_untouched_kinds():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding="same", padding_mode="reflect", bias=True),
        nn.Conv1d(8, 8, 1, groups=2), nn.ConvTranspose2d(8, 8, 2), WSConv2d(8, 8, 1),
    )
    report = convert_ws(model, include=lambda path, conv: conv.in_channels > 3)  # keep the RGB stem plain
    assert type(model[0]) is nn.Conv2d and report.skipped == [("0", "excluded by include=")]
    assert isinstance(model[1], WSConv1d) and model[1].groups == 2
    assert type(model[2]) is nn.ConvTranspose2d  # transposed convs are not standardized
    assert [r.path for r in report.replaced] == ["1"]  # the existing WSConv2d is left alone
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same", padding_mode="reflect"))
    convert_ws(model)
    x = torch.randn(1, 3, 5, 5)
    w = model[0].weight
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), standardize_weight(w), model[0].bias)
    torch.testing.assert_close(model(x), ref)
    with pytest.raises(ValueError, match="eps"):
        convert_ws(model, eps=-1.0)


def test_convert_ws_shared_conv():
    conv = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    report = convert_ws(model)
    assert model[0] is model[2] and isinstance(model[0], WSConv2d) and report.replaced[0].aliases == ["2"]
