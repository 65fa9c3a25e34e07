import pytest
import torch

from slimtune.modules.quant.nf4 import (
    NF4_CODE,
    NF4Linear,
    absmax_of,
    dequantize_nf4,
    dynamic_map_8bit,
    quantize_nf4,
)


def weights(seed=0, shape=(96, 160)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_code_table_is_sorted_and_symmetric_ends():
    assert NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and NF4_CODE[7] == 0
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])


@pytest.mark.parametrize("dq", [False, True])
def test_round_trip_error_and_size(dq):
    w = weights()
    packed, st = quantize_nf4(w, double_quant=dq)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2
    rel = ((dequantize_nf4(packed, st) - w).norm() / w.norm()).item()
    assert 0.07 < rel < 0.11  # the spec's ~0.092 on Gaussian weights
    assert st.absmax.dtype == (torch.uint8 if dq else torch.float32)


def test_high_nibble_first():
    w = torch.tensor([-1.0, 1.0] + [0.0] * 62)
    packed, _ = quantize_nf4(w, double_quant=False)
    assert packed[0, 0].item() == (0 << 4) | 15


def test_matches_bitsandbytes_codes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map_8bit(), F.create_dynamic_map(signed=True))
    for seed in range(3):
        w = weights(seed, (576, 320))
        for dq in (False, True):
            ref, ref_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
            ours, state = quantize_nf4(w, double_quant=dq)
            assert torch.equal(ours, ref)  # identical packed 4-bit codes
            if not dq:
                assert torch.equal(dequantize_nf4(ours, state), F.dequantize_4bit(ref, ref_state))
            else:  # DQ scale codes are nearest-rounded; bnb's search may pick the neighbour in a few blocks
                ref_absmax = F.dequantize_blockwise(ref_state.absmax, ref_state.state2) + ref_state.offset
                assert torch.allclose(absmax_of(state), ref_absmax, rtol=0.02)


def test_nf4_linear_has_no_float_weight_and_matches_dequant():
    lin = torch.nn.Linear(160, 96)
    q = NF4Linear(lin)
    assert not list(q.parameters())
    x = torch.randn(4, 160)
    expected = x @ q.dequantized_weight().T + lin.bias
    assert torch.allclose(q(x), expected, atol=1e-6)
    assert ((q(x) - lin(x)).norm() / lin(x).norm()) < 0.15


def test_nf4_linear_keeps_no_dequantized_weight_for_backward():
    """The input gradient equals the plain linear's on the dequantized weight, and autograd saves nothing of
    the weight's size (it is dequantized again in backward, as bitsandbytes does)."""
    from torch import nn

    from slimtune.modules.quant.nf4 import NF4Linear

    torch.manual_seed(0)
    q = NF4Linear(nn.Linear(64, 32, bias=True))
    x = torch.randn(4, 64, requires_grad=True)
    ref = nn.functional.linear(x, q.dequantized_weight(), q.bias)
    out = q(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=0, atol=0
    )
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        q(x).sum()
    assert all(n < 32 * 64 for n in saved), saved


def test_flop_counter_counts_the_bitsandbytes_4bit_forward():
    """bitsandbytes runs a 4-bit layer's forward inside one custom op; the counter must see it as a matmul, so a
    QLoRA step counts as many FLOPs as the same step with the pure-torch NF4 layer (forward + input gradient)."""
    pytest.importorskip("bitsandbytes")
    from torch.utils.flop_counter import FlopCounterMode

    from slimtune.modules.quant.backbone import bnb_works, quantize_decoder

    if not bnb_works(torch.device("cpu")):
        pytest.skip("bitsandbytes 4-bit does not run here")

    def counted(backend):
        model = torch.nn.Sequential(torch.nn.Linear(128, 192), torch.nn.Linear(192, 128))
        model.get_output_embeddings = lambda: None
        assert quantize_decoder(model, backend, double_quant=True) == backend
        x = torch.randn(6, 10, 128, requires_grad=True)
        with FlopCounterMode(display=False) as c:
            model(x).sum().backward()
        return c.get_total_flops()

    dense = 2 * 60 * 128 * 192 * 2 * 2  # two layers, forward + input gradient
    assert counted("torch") == dense
    assert counted("bitsandbytes") == dense
