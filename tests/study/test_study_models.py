"""Any norm plugs into any model, 1-D / 2-D / 3-D."""

import pytest
import torch
from torch import nn

from groupnorm.study.models import build_model
from groupnorm.study.norms import NORMS


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("model,dims", [("plain", 2), ("resnet", 2), ("plain", 3), ("resnet", 3), ("plain", 1)])
def test_every_norm_in_every_model(norm, model, dims):
    torch.manual_seed(0)
    m = build_model(model, norm, 2, 5, dims=dims, depth=8, widths=[8, 16], group_size=4, ghost_size=2)
    x = torch.randn(4, 2, *([6] * dims))
    out = m(x)
    assert out.shape == (4, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    m.eval()
    assert m(x[:1]).shape == (1, 5)


def test_resnet_zero_inits_last_norm_and_conv_bias_only_without_norm():
    m = build_model("resnet", "gn", 3, 10, depth=14, width=2, group_size=8)
    assert len(m.blocks) == 6
    for blk in m.blocks:
        assert torch.all(blk.n2.weight == 0) and torch.all(blk.n1.weight == 1)
    assert all(c.bias is None for c in m.modules() if isinstance(c, nn.Conv2d))
    m = build_model("resnet", "none", 3, 10, depth=8)
    assert all(c.bias is not None for c in m.modules() if isinstance(c, nn.Conv2d))
    with pytest.raises(ValueError, match="6n\\+2"):
        build_model("resnet", "bn", 3, 10, depth=10)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vit", "bn", 3, 10)


def test_augment_crops_and_flips_within_the_padded_image():
    from groupnorm.study.train import augment

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # every output value is 0 (padding) or a value of the same image and channel
    for k in range(2):
        for c in range(3):
            vals = set(out[k, c].flatten().tolist()) - {0.0}
            assert vals <= set(x[k, c].flatten().tolist())
    x3 = torch.randn(2, 1, 4, 4, 4)
    assert augment(x3, torch.Generator()) is x3  # volumes are left alone
