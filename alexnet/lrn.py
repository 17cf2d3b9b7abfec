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
backward). On the CPU, where each element-wise pass costs as much as a small convolution
and inductor's kernels measured slower than eager ones, the window sum is one matrix
product with a band matrix instead of n shifted slices (``_BandLRN``): fewer passes over
memory, most of them in place.
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


def band(channels: int, groups: int, size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """B with B[i, j] = 1 where input channel i is in output channel j's window [j - size//2, j + (size-1)//2]
    and in j's group (``groups`` contiguous blocks): ``window_sum(s) = s @ B`` on a (rows, channels)
    view, block-diagonal over the groups; its transpose is the window's adjoint."""
    i = torch.arange(channels, device=device)
    offset = i[:, None] - i[None, :]  # i - j
    group = i // (channels // groups)
    inside = (offset >= -(size // 2)) & (offset <= (size - 1) // 2) & (group[:, None] == group[None, :])
    return inside.to(dtype)


def _inverse_power(d: torch.Tensor, beta: float) -> torch.Tensor:
    """d^-beta. For the paper's beta = 0.75 as rsqrt(d) * sqrt(rsqrt(d)): vectorised on the CPU, where
    pow with a fractional exponent is a scalar loop (6x slower at AlexNet's shapes)."""
    if beta == 0.75:
        r = d.rsqrt()
        return r.mul_(r.sqrt())
    return d.pow(-beta)


class _BandLRN(torch.autograd.Function):
    """The same y = x * d^-beta, d = k + alpha/n * window_sum(x^2), on a ``(rows, C)`` (``channels_last``) or
    ``(N, C, rows)`` view, with window_sum(s) = s B (or B^T s) for the band matrix B of all G
    groups (block-diagonal: one wide product is faster than G narrow ones): one matrix product
    per direction instead of n shifted slices, and the element-wise passes in place where
    autograd allows. Backward as ``_LRN``'s:
      dx = dy * d^-beta - (2 alpha beta / n) * x * window_sum^T(dy * x * d^-beta / d).
    Saves x, d and d^-beta, as ``_LRN`` does eagerly.
    """

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k, groups: int, channels_last: bool):
        c = x.shape[-1] if channels_last else x.shape[-2]
        b = band(c, groups, size, x.dtype, x.device).mul_(alpha / size)
        ctx.args, ctx.band, ctx.channels_last = (size, alpha, beta, k), b, channels_last
        sq = x * x
        with torch.autocast(x.device.type, enabled=False):  # the window sum stays in fp32 under bf16 autocast
            d = (sq @ b if channels_last else b.t() @ sq).add_(k)
        del sq
        scale = _inverse_power(d, beta)
        ctx.save_for_backward(x, d, scale)
        return x * scale

    @staticmethod
    def backward(ctx, dy):
        size, alpha, beta, k = ctx.args
        x, d, scale = ctx.saved_tensors
        t = (dy * x).mul_(scale).div_(d)
        # b already holds alpha/n: the window's adjoint times alpha/n, so the constant is 2 beta
        with torch.autocast(x.device.type, enabled=False):
            back = t @ ctx.band.t() if ctx.channels_last else ctx.band @ t
        del t
        return (dy * scale).addcmul_(x, back, value=-2 * beta), None, None, None, None, None, None


def _band_lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> torch.Tensor:
    """``_BandLRN`` on x (N, C, H, W) in its own memory format, no copy: NHWC as (N*H*W, C) rows,
    NCHW as (N, C, H*W)."""
    n, c = x.shape[:2]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view: NHWC is (N, H, W, C) in memory
        y = _BandLRN.apply(rows, size, alpha, beta, k, groups, True)
        return y.view(n, *x.shape[2:], c).permute(0, 3, 1, 2)
    y = _BandLRN.apply(x.reshape(n, c, -1), size, alpha, beta, k, groups, False)
    return y.view(x.shape)


def local_response_norm(x: torch.Tensor, size: int, alpha: float, beta: float, k: float,
                        groups: int = 1) -> torch.Tensor:
    """LRN over channels (dim 1) within each of ``groups`` contiguous channel blocks; output in x's dtype.

    On the CPU (eager) by ``_BandLRN``, elsewhere (and when compiled) by ``_LRN``'s shifted slices."""
    c = x.shape[1]
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and x.dim() >= 3:
        return _band_lrn(x32, size, alpha, beta, k, groups).to(x.dtype)
    xg = x32.unflatten(1, (groups, c // groups))
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
