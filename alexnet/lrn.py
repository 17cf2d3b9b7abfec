"""Local response normalisation across channels, per filter group, in the input's dtype.

b_c = a_c / (k + alpha/n * sum_{c' in [c - n//2, c + (n-1)//2]} a_c'^2) ^ beta

with the window clipped to the channels of c's own group (G groups of C/G channels), so
one call on a slot holding several groups equals torch's ``nn.LocalResponseNorm(n, alpha,
beta, k)`` applied to each group (the tests compare them, forward and backward).

Why not torch's: it builds the window sum with avg_pool3d on a padded 5-D copy, and under
bf16 autocast its ``pow`` runs in fp32, so its output is fp32 and the max-pool after it
and the next convolution pay for conversions. Here the window is a sum of n shifted
slices, the backward is written out (autograd of the slices would materialise padded
copies), the arithmetic is fp32 (the sum of squares needs it) and the output has the
input's dtype. On CUDA the function is compiled once into fused kernels (forward and
backward); on CPU it runs eagerly.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def _window_sum(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """out[:, :, c] = sum of t[:, :, c - before .. c + after] along dim 2 (zero outside): n shifted slices."""
    pad = [0, 0] * (t.ndim - 3) + [before, after]
    padded = F.pad(t, pad)
    width = t.shape[2]
    out = padded.narrow(2, 0, width)
    for i in range(1, before + after + 1):
        out = out + padded.narrow(2, i, width)
    return out


class _LRN(torch.autograd.Function):
    """y = x * d^-beta, d = k + alpha/n * window_sum(x^2), on (N, groups, C/groups, ...) in fp32 or fp64.

    Backward by its formula (under torch.compile saving only x and recomputing d in the fused
    kernel; eagerly saving d and d^-beta):
      dx = dy * d^-beta - (2 alpha beta / n) * x * window_sum^T(dy * x * d^(-beta-1)),
    where window_sum^T, the transposed window, reaches as far after c as the forward reaches before.
    Under torch.compile each direction becomes one or two fused kernels.
    """

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        ctx.args = (size, alpha, beta, k)
        d = _window_sum(x * x, size // 2, (size - 1) // 2) * (alpha / size) + k
        scale = d.pow(-beta)
        # Compiled, recomputing d inside the fused backward is cheaper than storing it; eager, storing wins.
        ctx.save_for_backward(*((x,) if torch.compiler.is_compiling() else (x, d, scale)))
        return x * scale

    @staticmethod
    def backward(ctx, dy):
        size, alpha, beta, k = ctx.args
        if len(ctx.saved_tensors) == 1:
            (x,) = ctx.saved_tensors
            d = _window_sum(x * x, size // 2, (size - 1) // 2) * (alpha / size) + k
            scale = d.pow(-beta)
        else:
            x, d, scale = ctx.saved_tensors
        back = _window_sum(dy * x * scale / d, (size - 1) // 2, size // 2)
        return dy * scale - (2 * alpha * beta / size) * x * back, None, None, None, None


def local_response_norm(x: torch.Tensor, size: int, alpha: float, beta: float, k: float,
                        groups: int = 1) -> torch.Tensor:
    """LRN over channels (dim 1) within each of ``groups`` contiguous channel blocks; output in x's dtype."""
    c = x.shape[1]
    xg = x.unflatten(1, (groups, c // groups)).to(torch.promote_types(x.dtype, torch.float32))
    return _LRN.apply(xg, size, alpha, beta, k).flatten(1, 2).to(x.dtype)


def compiled_lrn():
    """``local_response_norm`` under torch.compile, with dynamic shapes.

    Every compiled copy of one function shares one dynamo cache (it is keyed by the code
    object), so a per-device dictionary of them would not separate anything: each entry is
    guarded on (device, grad mode, dtype, shapes), and two GPUs x {training, evaluation} x
    {full batch, last batch, tuning batch} pass dynamo's recompile limit (8), after which the
    rest runs eagerly. Dynamic shapes leave (device, grad mode, dtype): 4 entries on two GPUs.
    """
    return torch.compile(local_response_norm, dynamic=True)


class FastLRN(nn.Module):
    """``local_response_norm`` as a module; PerGroup passes a slot's group count (``groups_aware``).

    ``fused=True`` compiles the function on CUDA (Triton kernels); when the whole model is
    compiled it is traced inline instead. A failed compilation (no Triton, old GPU) warns
    once and falls back to eager.
    """

    groups_aware = True

    def __init__(self, size: int, alpha: float, beta: float, k: float, fused: bool = True):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.fused = fused
        self._compiled = None

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        args = (self.size, self.alpha, self.beta, self.k, groups)
        if self.fused and x.is_cuda and not torch.compiler.is_compiling():
            try:
                if self._compiled is None:
                    self._compiled = compiled_lrn()
                return self._compiled(x, *args)
            except Exception as e:  # noqa: BLE001  (any compiler failure: keep training, eagerly)
                warnings.warn(f"LRN: torch.compile failed on {x.device} ({type(e).__name__}: {e}); "
                              "using the eager LRN", stacklevel=2)
                self.fused = False
        return local_response_norm(x, *args)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
