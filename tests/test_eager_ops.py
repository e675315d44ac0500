"""The hand-written backward passes of RMSNorm and RoPE compute what autograd through the formulas does."""

import pytest
import torch
from torch import nn

from tokenmill.model.eager_ops import RMSNorm, apply_rope, rotate_half
from tokenmill.model.llama import ModelConfig, rope_angles


def test_rmsnorm_matches_torchs_values_and_gradients():
    torch.manual_seed(0)
    ours, theirs = RMSNorm(24, eps=1e-5), nn.RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 24, dtype=torch.float64) * 3
    upstream = torch.randn(3, 7, 24, dtype=torch.float64)
    grads = []
    for norm in (ours.double(), theirs.double()):
        xi = x.clone().requires_grad_()
        y = norm(xi)
        grads.append((y, *torch.autograd.grad((y * upstream).sum(), (xi, norm.weight))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # checkpoints and exports read the same names


@pytest.mark.parametrize("transposed", [False, True])  # q/k arrive as a transposed view of the projection
def test_rope_matches_the_rotate_half_formula_and_its_gradient(transposed):
    torch.manual_seed(1)
    cfg = ModelConfig(dim=32, n_heads=2, max_seq_len=16)
    angles = rope_angles(cfg)[:10].double()
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(2, 10, 2, 16, dtype=torch.float64) if transposed else torch.randn(2, 2, 10, 16, dtype=torch.float64)
    x.requires_grad_()
    q = x.transpose(1, 2) if transposed else x
    upstream = torch.randn(2, 2, 10, 16, dtype=torch.float64)
    ours = apply_rope(q, cos, sin)
    want = q * cos + rotate_half(q) * sin
    torch.testing.assert_close(ours, want)
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), x)
    (g_want,) = torch.autograd.grad((want * upstream).sum(), x)
    torch.testing.assert_close(g_ours, g_want)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (q.detach()[:1].clone().requires_grad_(),))
