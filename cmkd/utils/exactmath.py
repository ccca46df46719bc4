"""exp, log and sqrt whose float32 results are the same bits on every x86-64 machine.

On CPU, torch computes exp, log, sqrt (and tanh, erf, the trigonometric functions) of float32
tensors with MKL's vector math library (VML). VML picks its kernel by the machine's instruction
set and no MKL switch pins that choice: an AVX-512 machine and an AVX2-only one give different
last bits, since those float32 kernels are not correctly rounded (benchmarks/portability.py).
The functions here compute in float64 and round once to float32. For sqrt that is the correctly
rounded result on every machine (float64 carries more than twice float32's precision); for exp
and log it is wherever float64's extra 29 bits decide the rounding, which held for all of 8
million probes on both kernels. Any other device or dtype gets torch's own function.

Training code uses these instead of torch.exp / torch.log / torch.sqrt (and the optimisers run
fused, whose sqrt is the exact instruction); tests/test_determinism.py checks that a training
step of every method reaches no float32 VML kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: The aten functions whose CPU kernels hand contiguous float32 and float64 data to MKL's vector
#: math (ATen's cpu/vml.h, torch 2.13): their float32 results depend on the machine.
VML_SERVED_OPS = frozenset({"acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2",
                            "sin", "sqrt", "tan", "tanh", "trunc"})


def _rounded_once(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return fn(x.double()).float()
    return fn(x)


def exp(x: torch.Tensor) -> torch.Tensor:
    return _rounded_once(torch.exp, x)


def log(x: torch.Tensor) -> torch.Tensor:
    return _rounded_once(torch.log, x)


def sqrt(x: torch.Tensor) -> torch.Tensor:
    return _rounded_once(torch.sqrt, x)


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.logsumexp (its CPU kernel calls exp and log) with the exp and log above."""
    top = x.detach().amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return log(exp(x - top).sum(dim=dim)) + top.squeeze(dim)


def logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.logaddexp, whose gradient calls exp, with the exp above (log1p is ATen's own)."""
    top = torch.maximum(a, b)
    gap = (a - b).abs().nan_to_num(nan=0.0)  # two equal infinities: the gap is 0, the sum is top
    return top + torch.log1p(exp(-gap))
