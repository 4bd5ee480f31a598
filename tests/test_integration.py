"""groupnorm inside real (small) models: torch.compile, autocast, DDP, torch.jit.trace, and
the runnable guide docs/guide.md."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _integration_models import TinyResNet, UNetResBlock
from groupnorm import GroupNorm
from groupnorm.conversion import convert, convert_ws, fuse
from groupnorm.testing import free_port

ROOT = Path(__file__).resolve().parents[1]

# the argument checks in groupnorm._validate read shapes while torch.jit.trace records: the
# tracer warns that they become constants (they only check, they compute nothing)
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]


def _gn_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = convert(TinyResNet(), 4).model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial affine so wrong parameter handling shows
        for m in model.modules():
            if isinstance(m, GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


# ---------------------------------------------------------------- torch.compile

def test_compile_fullgraph_dynamic_train_step_resnet():
    # fullgraph=True: the custom op must not graph-break; dynamic=True: one graph for every
    # batch and spatial size (the fake kernel is shape-generic). aot_eager exercises Dynamo,
    # the fake kernels and AOTAutograd (fwd + bwd) without Inductor's minute-long C++ build.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _gn_resnet()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    # non-square first shape: equal sizes would be "duck-sized" into one symbol and recompile
    frames = None
    for shape in [(2, 3, 16, 12), (3, 3, 12, 20), (5, 3, 8, 8)]:
        x = torch.randn(shape)
        model.zero_grad()
        out = compiled(x)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = model(x)
        ref.square().mean().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
        frames = frames or counter.frame_count
        assert counter.frame_count == frames  # no recompilation for new N, H, W
    torch._dynamo.reset()


def test_compile_inductor_fullgraph_unet_block():
    # the real default backend on a small fused UNet block (forward; Inductor compiles C++)
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = fuse(UNetResBlock(8, 8)).model.eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = block(x)
        out = torch.compile(block, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu_resnet(dtype):
    # Behaviour (documented in docs/guide.md): groupnorm is not on autocast's op lists, so it
    # runs in the dtype it receives. Under CPU autocast the conv before it returns `dtype`,
    # so GroupNorm gets a half input with fp32 parameters (allowed: master weights), computes
    # its statistics in fp32 and returns `dtype`, exactly like torch.nn.GroupNorm on CPU.
    model = _gn_resnet()
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    seen = {}
    h = model.bn1.register_forward_hook(lambda m, a, o: seen.update(inp=a[0].dtype, out=o.dtype))
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        torch_gn = nn.GroupNorm(4, 8)(model.conv1(x))
    h.remove()
    assert seen == {"inp": dtype, "out": dtype} and torch_gn.dtype == dtype
    tol = 0.08 if dtype == torch.bfloat16 else 0.02
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    out.float().square().mean().backward()
    w = model.layer1[0].bn1.weight
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


# ---------------------------------------------------------------- DDP (2 gloo processes)

def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = convert_ws(_gn_resnet(seed=0)).model  # GN + WS, same init on every rank
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x, y = torch.load(os.path.join(out_dir, "batch.pt"))
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(ddp(x[shard]), y[shard]).backward()  # grads all-reduced (averaged)
            opt.step()
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    # GroupNorm has no cross-sample statistics, so DDP on two half-batches is the same
    # optimisation as one process on the whole batch (BatchNorm would differ here).
    import torch.multiprocessing as mp

    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    torch.save((x, y), tmp_path / "batch.pt")
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

    model = convert_ws(_gn_resnet(seed=0)).model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)  # ranks in sync
        torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-5, msg=k)  # = full-batch step


# ---------------------------------------------------------------- torch.jit.trace

def test_jit_trace_save_load_resnet(tmp_path):
    # the custom op is recorded as a call to groupnorm::fwd; batch and spatial sizes stay free
    model = _gn_resnet().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
    assert "groupnorm::fwd" in str(traced.inlined_graph)
    path = tmp_path / "resnet.pt"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    for shape in [(2, 3, 16, 16), (3, 3, 20, 12)]:
        x2 = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x2), model(x2), rtol=1e-5, atol=1e-5)
    # trained through the trace too
    traced(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.bn1.weight.grad is not None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript is deprecated in recent torch
def test_jit_script_save_load_and_train(tmp_path):
    # torch.jit.script compiles GroupNorm's scriptable stand-in (__prepare_scriptable__):
    # same outputs, gradients, state_dict keys; a residual argument; affine=False
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gn1 = GroupNorm(4, 8, activation="silu")
            self.gn2 = GroupNorm(2, 8, affine=False)

        def forward(self, x):
            h = self.conv(x)
            return self.gn2(self.gn1(h), residual=h)

    model = Block()
    scripted = torch.jit.script(model)
    assert list(scripted.state_dict()) == list(model.state_dict())
    path = tmp_path / "block.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 3, 6, 5).contiguous(memory_format=torch.channels_last)
    ref = model(x)
    for m in (scripted, loaded):
        torch.testing.assert_close(m(x), ref)
    scripted(x).square().sum().backward()  # the scripted module shares the Parameters
    g_script = model.gn1.weight.grad.clone()
    model.zero_grad()
    model(x).square().sum().backward()
    torch.testing.assert_close(g_script, model.gn1.weight.grad)
    with pytest.raises(Exception, match=r"expected input of shape \(N, 8, \*\)"):
        torch.jit.script(GroupNorm(2, 8))(torch.randn(2, 6, 3))


class _ResidualCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.gn = GroupNorm(2, 8, activation="gelu")

    def forward(self, x, r):
        return self.gn(x, residual=r, return_sum=True)


def test_jit_trace_fused_residual_return_sum():
    m = _ResidualCall()
    gn = m.gn
    x, r = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    traced = torch.jit.trace(m, (x, r))
    y, s = traced(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, F.gelu(F.group_norm(x + r, 2, gn.weight, gn.bias)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- docs/guide.md, README.md

def _doc_blocks(doc: str) -> list[str]:
    text = (ROOT / doc).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("doc,min_blocks", [("docs/guide.md", 4), ("README.md", 1)])
def test_doc_code_blocks_run(doc, min_blocks, tmp_path, monkeypatch):
    # every ```python block of the document runs, in order, in one namespace (as a reader would)
    blocks = _doc_blocks(doc)
    assert len(blocks) >= min_blocks
    monkeypatch.chdir(tmp_path)  # the guide writes model.onnx to the working directory
    ns: dict = {"__name__": "guide"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{doc}[block {i}]", "exec"), ns)
        except ModuleNotFoundError as e:  # the ONNX block needs the optional extra
            if e.name in ("onnx", "onnxscript", "onnxruntime"):
                pytest.skip(f"{doc} block {i} needs {e.name} (pip install 'groupnorm[onnx]')")
            raise
