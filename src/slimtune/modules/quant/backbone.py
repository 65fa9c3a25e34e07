"""Putting a model's decoder into 4-bit NF4: bitsandbytes where it runs, else the pure-torch NF4 layer."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def bnb_works(device: torch.device) -> bool:
    """True if bitsandbytes' 4-bit linear runs on ``device`` here (probed once on a tiny layer)."""
    try:
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        lin = lin.to(device)
        lin(torch.randn(2, 64, device=device))
        return True
    except Exception as err:  # any failure means: use the pure-torch path
        log.info("bitsandbytes 4-bit not usable on %s (%s); using pure-torch NF4", device, err)
        return False


def register_bnb_flops() -> None:
    """Teach ``FlopCounterMode`` the FLOPs of bitsandbytes' 4-bit matmul op: its forward runs inside one custom
    op (``bitsandbytes::gemm_4bit``) that the counter does not see into, so a QLoRA step counted only its backward
    (362 instead of 579 GFLOP for SmolLM2 at 4 x 256). 2·M·N·K, as for a dense matmul of the same shape."""
    import bitsandbytes  # noqa: F401  (defines the op)
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = getattr(torch.ops.bitsandbytes, "gemm_4bit", None)
    if op is None or op in flop_registry:
        return

    @register_flop_formula(op)
    def _flops(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for n in a_shape[:-1]:
            rows *= n
        return 2 * rows * shape_b[0] * shape_b[1]


def _linear_children(model: nn.Module, skip: set[int]) -> list[tuple[nn.Module, str, nn.Linear]]:
    out = []
    for parent in model.modules():
        for cname, child in parent.named_children():
            if type(child) is nn.Linear and id(child) not in skip:
                out.append((parent, cname, child))
    return out


def quantize_decoder(model: nn.Module, backend: str, double_quant: bool) -> str:
    """Replace every decoder ``nn.Linear`` (not the LM head) by a frozen NF4 layer; returns the backend used."""
    from slimtune.modules.quant.nf4 import NF4Linear

    device = next(model.parameters()).device
    if backend == "auto":
        backend = "bitsandbytes" if bnb_works(device) else "torch"
    if backend == "bitsandbytes":
        register_bnb_flops()
    head = model.get_output_embeddings()
    for parent, cname, lin in _linear_children(model, skip={id(head)}):
        if backend == "bitsandbytes":
            import bitsandbytes as bnb

            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=lin.weight.dtype,
                compress_statistics=double_quant,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant
            )
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
            # bitsandbytes 0.50 repacks a CPU layer's weights for a bf16 kernel on its first eval-mode call
            # (on CPUs with AVX512-BF16); after that its forward is no longer differentiable w.r.t. the input,
            # so a later training step silently stops back-propagating through every frozen 4-bit layer.
            q.support_avx512bf16_for_cpu = False
            q = q.to(device)
        else:
            q = NF4Linear(lin, double_quant=double_quant)
        setattr(parent, cname, q)
    for p in model.parameters():
        p.requires_grad_(False)
    return backend


def is_4bit(module: nn.Module) -> bool:
    from slimtune.modules.quant.nf4 import NF4Linear

    return isinstance(module, NF4Linear) or type(module).__name__ == "Linear4bit"


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a 4-bit layer effectively multiplies by.

    bitsandbytes repacks its CPU weights for inference on first use (its quant_state changes), so the raw codes
    are not read directly: the layer is applied to the identity matrix, W = layer(I)^T - bias, which is exact
    for whatever layout and compute dtype the layer uses.
    """
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight()
    dtype = layer.compute_dtype or torch.float32
    with torch.no_grad():
        eye = torch.eye(layer.in_features, dtype=dtype, device=layer.weight.device)
        out = layer(eye)
        if layer.bias is not None:
            out = out - layer.bias.to(out.dtype)
    return out.T.contiguous().float()


def nf4_weight_bytes(
    model: nn.Module, double_quant: bool = True, blocksize: int = 64, other_bytes_per_param: int = 2
) -> dict[str, int]:
    """Bytes a model takes with its decoder linears in NF4 (works on a meta-device model: nothing is allocated).

    codes: 0.5 B/weight; scales: 4 B per block of 64, or with double quantization 1 B per block plus an fp32
    scale per 256 blocks and one fp32 offset per tensor; everything else (embeddings, norms, LM head) at
    ``other_bytes_per_param`` (16-bit by default).
    """
    head = model.get_output_embeddings()
    quantized = [lin for _, _, lin in _linear_children(model, skip={id(head)})]
    q_ids = {id(lin.weight) for lin in quantized}
    codes = scales = 0
    for lin in quantized:
        n = lin.weight.numel()
        blocks = -(-n // blocksize)
        codes += -(-n // 2)
        scales += blocks + 4 * -(-blocks // 256) + 4 if double_quant else 4 * blocks
    other = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in q_ids)
    return {
        "codes": codes,
        "scales": scales,
        "other": other * other_bytes_per_param,
        "total": codes + scales + other * other_bytes_per_param,
    }
