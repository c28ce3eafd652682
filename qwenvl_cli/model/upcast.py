"""When a decoder linear computes a long input in float32 (loader.load_model's upcast_prefill): on CPUs
whose bfloat16 matmuls are slow, bfloat16 inputs upcast exactly, and float32 inputs of quantized weights on
their float32 dequantization instead of a bfloat16 one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# From this many rows on, a linear with `upcast` set computes a bfloat16 input as a float32 GEMM (see
# loader.load_model's upcast_prefill): below it the weight's transient float32 copy costs more than it saves.
# A float32 input of a quantized weight takes it beyond the rows of torch's int8/int4 kernels.
_UPCAST_ROWS = 128


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear of x # (..., K) and a weight # (N, K) computed in float32: bfloat16 operands upcast exactly
    (products exact, float32 sums, as a bfloat16 GEMM has them), the result rounded once to x's dtype."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def upcasts(module: nn.Module, x: torch.Tensor) -> bool:
    """`module` (its `upcast` set by the loader) computes x # (..., K) as a float32 GEMM."""
    rows = x.numel() // max(x.shape[-1], 1)
    return module.upcast and (rows >= _UPCAST_ROWS if x.dtype == torch.bfloat16 else x.dtype == torch.float32)
