"""The chunked head + cross-entropy (moeforge.ops.cross_entropy) == logits then F.cross_entropy."""

import pytest
import torch

from moeforge.ops import cross_entropy
from moeforge.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


def _case(n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 16, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, generator=g, requires_grad=True)
    return h, w, torch.randint(0, 50, (n,), generator=g)


@pytest.mark.parametrize("n,chunk", [(37, 8), (64, 512)])
@pytest.mark.parametrize("scale", [1.0, 3.0])  # the gradients are computed for 1 and scaled in the backward pass
def test_fused_linear_cross_entropy_matches_reference(n, chunk, scale):
    h, w, t = _case(n)
    loss = linear_cross_entropy(h, w, t, chunk)
    ref = linear_cross_entropy_reference(h, w, t)
    torch.testing.assert_close(loss, ref.to(loss.dtype))
    g1 = torch.autograd.grad(loss * scale, [h, w])
    g2 = torch.autograd.grad(ref * scale, [h, w])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_two_losses_through_one_head_sum_their_gradients():
    """The main and MTP losses share the head weight: each call's precomputed gradient adds up."""
    h, w, t = _case(20)
    h2 = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    t2 = torch.randint(0, 50, (12,))
    (linear_cross_entropy(h, w, t, 8) + 0.3 * linear_cross_entropy(h2, w, t2, 8)).backward()
    got = [x.grad.clone() for x in (h, h2, w)]
    for x in (h, h2, w):
        x.grad = None
    (linear_cross_entropy_reference(h, w, t) + 0.3 * linear_cross_entropy_reference(h2, w, t2)).backward()
    for a, x in zip(got, (h, h2, w), strict=True):
        torch.testing.assert_close(a, x.grad)


@pytest.mark.parametrize("which", ["h", "w"])
def test_only_the_gradient_asked_for_is_computed(which, monkeypatch):
    h, w, t = _case(20)
    (h if which == "w" else w).requires_grad_(False)
    shapes = []
    real_mm = cross_entropy.mm
    monkeypatch.setattr(cross_entropy, "mm", lambda a, b: shapes.append((a.shape[0], b.shape[1])) or real_mm(a, b))
    loss = linear_cross_entropy(h, w, t, 8)
    (g,) = torch.autograd.grad(loss, [h if which == "h" else w])
    ref = linear_cross_entropy_reference(h, w, t)
    (want,) = torch.autograd.grad(ref, [h if which == "h" else w])
    torch.testing.assert_close(g, want)
    logits = [s for s in shapes if s[1] == 50]  # (rows, vocab): one per chunk of 8 rows
    grad_h = [s for s in shapes if s[1] == 16 and s[0] != 50]  # (rows, hidden)
    grad_w = [s for s in shapes if s == (50, 16)]  # (vocab, hidden)
    assert len(logits) == 3
    assert (len(grad_h), len(grad_w)) == ((3, 0) if which == "h" else (0, 3))


def test_without_autograd_only_the_loss_is_computed(monkeypatch):
    h, w, t = _case(20)
    products = []
    real_mm = cross_entropy.mm
    monkeypatch.setattr(cross_entropy, "mm", lambda a, b: products.append(b.shape[1]) or real_mm(a, b))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, 8)
    assert loss.grad_fn is None and products == [50, 50, 50]  # the logits of 3 chunks, no gradient products
    torch.testing.assert_close(loss.float(), linear_cross_entropy_reference(h, w, t))


def test_bf16_under_autocast_close_to_fp32():
    h, w, t = _case(300, torch.float32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, 128)
    assert loss.dtype == torch.float32
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = linear_cross_entropy_reference(h.bfloat16().float(), w.bfloat16().float(), t)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gh, h.grad, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(gw, w.grad, atol=2e-3, rtol=2e-2)
