"""The fused frozen-head cross-entropy equals the plain one, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.losses import frozen_head_cross_entropy


def _reference(h, w, labels):
    logits = h @ w.t()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.mark.parametrize("chunk", [1, 5, 64, 4096])
def test_frozen_head_ce_matches_reference(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, dtype=torch.float64)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, 7:] = -100
    h1 = h.clone().requires_grad_()
    h2 = h.clone().requires_grad_()
    fused = frozen_head_cross_entropy(h1, w, labels, chunk=chunk)
    ref = _reference(h2, w, labels)
    (fused * 3).backward()
    (ref * 3).backward()
    torch.testing.assert_close(fused, ref.to(fused.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-10)


def test_frozen_head_ce_all_ignored_is_zero_and_refuses_trainable_head():
    h = torch.randn(1, 4, 8, requires_grad=True)
    w = torch.randn(10, 8)
    loss = frozen_head_cross_entropy(h, w, torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="frozen"):
        frozen_head_cross_entropy(h, w.requires_grad_(), torch.zeros(1, 4, dtype=torch.long))
