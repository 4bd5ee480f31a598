"""ONNX export of models using groupnorm, checked by running them in onnxruntime."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import groupnorm.onnx as gx  # noqa: E402
from _integration_models import TinyResNet, UNetResBlock  # noqa: E402
from groupnorm import GroupNorm  # noqa: E402
from groupnorm.conversion import convert, fuse  # noqa: E402

# torch's own exporter internals warn about a deprecated pytree API: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

DYN4 = ({0: "batch", 2: "height", 3: "width"},)


def _ort(path, *xs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)}
    return sess.run(None, feeds)


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _randomize(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (GroupNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))


ACTS = (None, "silu", "gelu", "relu")


class ResidualModel(nn.Module):
    """conv -> GN with fused residual (and the returned sum) -> one GN per fused activation
    (one export covers every activation: exports are slow)."""

    def __init__(self, acts=ACTS):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn_res = GroupNorm(2, 8)
        # distinct G per GroupNorm: the exporter's optimizer would merge identical statistics
        self.gn_act = nn.ModuleList([GroupNorm(g, 8, activation=a) for g, a in zip((4, 8, 1, 2), acts)])

    def forward(self, x):
        h = self.conv(x)
        y, s = self.gn_res(h, residual=torch.tanh(h), return_sum=True)
        return tuple(gn(y) + s for gn in self.gn_act)


@pytest.mark.parametrize("opset", [18, 20, 21])
def test_export_activations_residual_dynamic_shapes(tmp_path, opset):
    torch.manual_seed(0)
    model = ResidualModel().eval()
    _randomize(model)
    path = tmp_path / "m.onnx"
    gx.export(model, (torch.randn(2, 3, 8, 8),), path, opset=opset, dynamic_shapes=DYN4)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [opset]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 3 and all(isinstance(d, str) for d in dims[2:])  # symbolic N, H, W
    ops = _ops(path)
    n_gn = 1 + len(ACTS)
    if opset >= 21:  # the standard node, one per GroupNorm, no decomposition
        assert ops.count("GroupNormalization") == n_gn and "ReduceMean" not in ops
        gn = next(n for n in proto.graph.node if n.op_type == "GroupNormalization")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gn.attribute}
        assert attrs["num_groups"] == 2 and attrs["stash_type"] == 1
        assert "Gelu" in ops  # opset 20+ has an exact Gelu op
    else:  # opset 18's GroupNormalization has per-group scale: must not be used
        assert "GroupNormalization" not in ops and ops.count("ReduceMean") == 2 * n_gn
        assert ("Gelu" in ops) == (opset >= 20) and ("Erf" in ops) == (opset < 20)  # Gelu op: opset 20
    assert "Sigmoid" in ops and "Relu" in ops
    # other batch and spatial sizes than the example (odd, non-square, batch 1)
    for shape in [(5, 3, 11, 7), (1, 3, 4, 6)]:
        x = torch.randn(shape)
        got = _ort(path, x)
        with torch.no_grad():
            ref = model(x)
        assert len(got) == len(ref) == len(ACTS)
        for act, g, r in zip(ACTS, got, ref):
            np.testing.assert_allclose(g, r.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{act} {shape}")


@pytest.mark.parametrize("opset", [18, 21])
def test_export_converted_resnet_and_fused_unet_block(tmp_path, opset):
    torch.manual_seed(0)
    resnet = convert(TinyResNet(), 4).model.eval()
    _randomize(resnet)
    unet = fuse(UNetResBlock(8, 16)).model.eval()
    _randomize(unet)
    for name, model, example, other in [
        ("resnet", resnet, torch.randn(2, 3, 16, 16), torch.randn(3, 3, 24, 20)),
        ("unet", unet, torch.randn(2, 8, 8, 8), torch.randn(4, 8, 10, 6)),
    ]:
        path = tmp_path / f"{name}.onnx"
        gx.export(model, (example,), path, opset=opset, dynamic_shapes=DYN4)
        (got,) = _ort(path, other)
        with torch.no_grad():
            np.testing.assert_allclose(got, model(other).numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


class Ranks(nn.Module):
    """One model, four inputs: the ranks and affine variants (one export instead of four)."""

    def __init__(self):
        super().__init__()
        # 3-D volumes without affine; (N, C) input (no spatial dims); 1-D with G=C; weight without bias
        self.vol = nn.Sequential(nn.Conv3d(2, 6, 1), GroupNorm(3, 6, affine=False, activation="gelu"))
        self.flat = nn.Sequential(nn.Linear(5, 6), GroupNorm(2, 6, activation="silu"))
        self.inst = nn.Sequential(nn.Conv1d(2, 6, 1), GroupNorm(6, 6))
        self.nobias = GroupNorm(2, 6, bias=False)

    def forward(self, a, b, c, d):
        return self.vol(a), self.flat(b), self.inst(c), self.nobias(d)


@pytest.mark.parametrize("opset", [18, 21])
def test_export_ranks_and_no_affine(tmp_path, opset):
    model = Ranks().eval()
    _randomize(model)
    xs = (torch.randn(2, 2, 3, 4, 5), torch.randn(3, 5), torch.randn(3, 2, 7), torch.randn(2, 6, 3))
    path = tmp_path / "m.onnx"
    gx.export(model, xs, path, opset=opset, external_data=False)  # passed through to torch
    assert not path.with_name("m.onnx.data").exists()  # one self-contained file
    got = _ort(path, *xs)
    with torch.no_grad():
        for i, (g, r) in enumerate(zip(got, model(*xs))):
            np.testing.assert_allclose(g, r.numpy(), rtol=1e-4, atol=1e-5, err_msg=str(i))


@pytest.mark.parametrize("opset", [18, 21])
def test_export_fp16_model_normalizes_in_fp32(tmp_path, opset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), GroupNorm(4, 8, activation="silu")).eval().half()
    x = torch.randn(2, 3, 8, 8).half()
    path = tmp_path / "h.onnx"
    gx.export(model, (x,), path, opset=opset)
    assert "Cast" in _ops(path)  # statistics in fp32, as the op computes them
    (got,) = _ort(path, x)
    assert got.dtype == np.float16
    with torch.no_grad():
        np.testing.assert_allclose(got.astype(np.float32), model(x).float().numpy(), rtol=1e-2, atol=1e-2)


def test_opset_below_18_is_a_clear_error(tmp_path):
    model = nn.Sequential(GroupNorm(2, 4))
    for bad in (17, 9):
        with pytest.raises(gx.UnsupportedOpsetError, match=f"opset {bad} is not supported.*opset >= 18"):
            gx.export(model, (torch.randn(2, 4, 3),), tmp_path / "m.onnx", opset=bad)
        with pytest.raises(gx.UnsupportedOpsetError):
            gx.translation_table(bad)
    assert issubclass(gx.UnsupportedOpsetError, ValueError)
    with pytest.raises(TypeError, match="opset must be an int"):
        gx.export(model, (torch.randn(2, 4, 3),), tmp_path / "m.onnx", opset="21")
    assert not (tmp_path / "m.onnx").exists()


def test_plain_torch_onnx_export_with_translation_table(tmp_path):
    # users calling torch.onnx.export themselves only add the table
    model = nn.Sequential(nn.Conv2d(3, 4, 1), GroupNorm(2, 4, activation="relu")).eval()
    x = torch.randn(2, 3, 5, 5)
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=21,
                                custom_translation_table=gx.translation_table(21))
    path = tmp_path / "p.onnx"
    program.save(str(path))
    (got,) = _ort(path, x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
    # without the table the exporter cannot translate the custom op
    with pytest.raises(Exception, match="groupnorm"):
        torch.onnx.export(model, (x,), dynamo=True, opset_version=21)


def test_export_without_path_returns_program(tmp_path):
    model = nn.Sequential(GroupNorm(2, 4)).eval()
    program = gx.export(model, (torch.randn(2, 4, 3),), opset=21)
    assert "GroupNormalization" in [n.op_type for n in program.model_proto.graph.node]


def test_legacy_torchscript_exporter(tmp_path):
    # dynamo=False goes through torch.jit.trace + a registered symbolic (opset-18 decomposition)
    torch.manual_seed(0)
    model = ResidualModel(("silu",)).eval()
    _randomize(model)
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated upstream
        gx.export(model, (torch.randn(2, 3, 8, 8),), path, opset=18, dynamo=False,
                  input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    x = torch.randn(3, 3, 5, 9)
    (got,) = _ort(path, x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x)[0].numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs a path"):
        gx.export(model, (x,), None, dynamo=False)
