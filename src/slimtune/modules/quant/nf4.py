"""4-bit NormalFloat (NF4) quantization in pure PyTorch, byte-compatible with bitsandbytes.

Scheme (Dettmers et al., QLoRA, 2023): flatten W, split into blocks of 64, scale each block by its absmax,
map each value to the nearest of 16 NF4 code values, pack two 4-bit indices per byte (high nibble first).
Double quantization ("DQ") stores the fp32 absmax vector as ``offset + code8[q] * absmax2[block]``: absmax minus
its mean, 8-bit blockwise (block 256) on the signed dynamic map. Dequantization is a table lookup.

``quantize_nf4`` gives the same packed codes as ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``
(tested against it when bitsandbytes is installed), so either backend can load the other's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


@lru_cache(maxsize=1)
def dynamic_map_8bit() -> torch.Tensor:
    """The signed 8-bit dynamic quantization map (7 exponent bits) used for double quantization.

    For exponent i in 0..6 it holds ±10^(i-6)·m for the 2^i midpoints m of an even split of [0.1, 1], plus 0 and 1,
    padded with zeros to 256 values and sorted. Cached: do not modify the returned tensor.
    """
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value; an exact midpoint goes to the lower code (as bitsandbytes does)."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x, mids, right=False).to(torch.uint8)


@dataclass
class NF4State:
    """What is needed to dequantize: shape, absmax (plain fp32 or double-quantized), block sizes."""

    shape: torch.Size
    absmax: torch.Tensor  # fp32 [n_blocks] or uint8 [n_blocks] when double-quantized
    blocksize: int = 64
    offset: float | None = None  # DQ: mean subtracted from absmax
    absmax2: torch.Tensor | None = None  # DQ: fp32 [ceil(n_blocks/256)]
    blocksize2: int = 256


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, NF4State]:
    """Quantize ``w`` to packed NF4 bytes ``[numel/2, 1]`` (uint8) and the state to dequantize it."""
    flat = w.detach().reshape(-1).float()
    blocks, absmax = _blockwise_absmax(flat, blocksize)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    idx = _nearest(scaled.reshape(-1)[: flat.numel()], NF4_CODE.to(flat.device))
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    packed = (idx[0::2] << 4) | idx[1::2]
    state = NF4State(shape=w.shape, absmax=absmax, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        blocks2, absmax2 = _blockwise_absmax(absmax - offset, state.blocksize2)
        scaled2 = blocks2 / absmax2.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        q8 = _nearest(scaled2.reshape(-1)[: absmax.numel()], dynamic_map_8bit().to(flat.device))
        state.absmax, state.offset, state.absmax2 = q8, float(offset), absmax2
    return packed.view(-1, 1), state


def absmax_of(state: NF4State) -> torch.Tensor:
    """The fp32 per-block scales (decoding the double quantization if used)."""
    if state.absmax2 is None:
        return state.absmax
    code8 = dynamic_map_8bit().to(state.absmax.device)
    vals = code8[state.absmax.long()]
    scale2 = state.absmax2.repeat_interleave(state.blocksize2)[: vals.numel()]
    return vals * scale2 + state.offset


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_nf4` (up to the quantization error)."""
    p = packed.reshape(-1)
    idx = torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)
    n = 1
    for s in state.shape:
        n *= s
    vals = NF4_CODE.to(p.device)[idx.long()][:n]
    scales = absmax_of(state).repeat_interleave(state.blocksize)[:n]
    return (vals * scales).to(dtype).view(state.shape)


class _DequantLinear(torch.autograd.Function):
    """y = x Wᵀ with W = dequant(codes), dequantized again in backward (dL/dx = dL/dy · W) instead of saved:
    autograd would otherwise keep every layer's full-precision weight from forward to backward, as many bytes as
    the unquantized model (bitsandbytes' kernels re-dequantize the same way). W is frozen: no weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return nn.functional.linear(x, layer.dequantized_weight())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.dequantized_weight(), None


class NF4Linear(nn.Module):
    """A frozen linear layer stored as NF4 codes (buffers, never Parameters): ``y = x @ dequant(W)^T + b``.

    Used when bitsandbytes is not available. The dequantized weight exists only inside ``forward``.
    """

    def __init__(
        self,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype or linear.weight.dtype
        packed, st = quantize_nf4(linear.weight, blocksize, double_quant)
        self.register_buffer("qweight", packed)
        self.register_buffer("absmax", st.absmax)
        self.register_buffer("absmax2", st.absmax2 if st.absmax2 is not None else torch.empty(0))
        self._meta = (st.shape, blocksize, st.offset, st.blocksize2)
        bias = linear.bias
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    def state(self) -> NF4State:
        shape, bs, offset, bs2 = self._meta
        return NF4State(
            shape=shape,
            absmax=self.absmax,
            blocksize=bs,
            offset=offset,
            absmax2=self.absmax2 if offset is not None else None,
            blocksize2=bs2,
        )

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_nf4(self.qweight, self.state(), self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantLinear.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, dq={self._meta[2] is not None}"
