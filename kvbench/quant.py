"""Pure quantization primitives (no model, no state), in the style of torchao's ``quantize_affine``.

Every function takes an explicit reduction ``dim`` (the axis the statistics are taken over) and a
``group_size`` (how many consecutive elements along ``dim`` share one scale). For a K/V tensor of
shape ``(B, H_kv, T, D)``:

=================  ========  ============  ==========================================
granularity        dim       group_size    one (scale, zero) per
=================  ========  ============  ==========================================
per-token          -1        None          token and head (D elements)
per-token grouped  -1        g (g | D)     token, head and group of g channels
per-channel        -2        None          channel and head (all T tokens)
per-channel block  -2        g             channel, head and block of g tokens
=================  ========  ============  ==========================================

Quantization is asymmetric: ``q = clamp(round((x - lo) / scale), 0, 2**bits - 1)`` and
``x_hat = q * scale + lo`` with ``scale = (hi - lo) / (2**bits - 1)``; ``lo`` is the zero point
(stored in fp16, as KIVI does), so one group costs two fp16 numbers.

Non-uniform quantization (NUQ, KVQuant) works on values normalized to ``[-1, 1]`` by a range
``[lo, hi]`` (:func:`normalize`), rounded to the nearest entry of a sorted 1-D ``codebook``
(:func:`quantize_codebook`: ``torch.bucketize`` against the "signposts", the midpoints between
neighbouring centroids). A uniform ``b``-bit grid is the codebook ``linspace(-1, 1, 2**b)``
(:func:`uniform_codebook`). Codebooks are learned by (Fisher-)weighted 1-D k-means
(:func:`kmeans_1d`) and can be moment-matched afterwards (Q-Norm, :func:`q_norm`).

Dense-and-sparse (KVQuant): the outliers of each slice along ``dim`` are kept in full precision
and the rest is quantized with the outliers removed from its range. ``frac`` is the *total*
outlier fraction, split evenly between the largest and the smallest values: ``frac=0.01`` keeps
the top 0.5 % and the bottom 0.5 % (``k = round(n * frac / 2)`` per side and slice of ``n``
elements):

==========================  =========================  =====  ===========================
split                       tensor                     dim    thresholds per
==========================  =========================  =====  ===========================
per-token (values, online)  ``(B, T, H_kv * D)``       -1     token (over all heads)
per-channel (keys, offline) ``(H_kv, D, N * T)``       -1     head and channel (calibrated)
==========================  =========================  =====  ===========================
"""

from __future__ import annotations

import torch

SCALE_ZERO_BITS = 32  # one fp16 scale + one fp16 zero point per group


def _grouped(x: torch.Tensor, dim: int, group_size: int | None) -> tuple[torch.Tensor, int]:
    """Move ``dim`` last and split it into ``(n_groups, group_size)``; returns the view and ``dim``."""
    dim = dim % x.dim()
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    g = n if group_size is None else group_size
    if n % g != 0:
        raise ValueError(f"group size {g} does not divide the quantized axis of length {n}")
    return x.reshape(*x.shape[:-1], n // g, g), dim


def _ungrouped(xg: torch.Tensor, dim: int) -> torch.Tensor:
    return xg.flatten(-2).movedim(-1, dim)


def quantize_affine(
    x: torch.Tensor, bits: int, dim: int = -1, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization.

    Args:
        x: tensor of any shape, e.g. ``(B, H_kv, T, D)``.
        bits: code width (1..8).
        dim: axis the statistics are reduced over (see the module table).
        group_size: elements along ``dim`` that share one scale; ``None`` for the whole axis.

    Returns:
        ``(codes, scale, lo)``: ``codes`` (uint8) has ``x``'s shape; ``scale`` and ``lo`` have
        ``x``'s shape with ``dim`` replaced by the number of groups.
    """
    xg, d = _grouped(x, dim, group_size)
    lo = xg.amin(-1, keepdim=True)
    hi = xg.amax(-1, keepdim=True)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    codes = torch.clamp(torch.round((xg - lo) / scale), 0, qmax).to(torch.uint8)
    return _ungrouped(codes, d), scale.squeeze(-1).movedim(-1, d), lo.squeeze(-1).movedim(-1, d)


def dequantize_affine(
    codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dim: int = -1, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_affine` (the group size is implied by the shapes)."""
    d = dim % codes.dim()
    n_groups = scale.shape[d]
    cg, _ = _grouped(codes, d, codes.shape[d] // n_groups)
    s = scale.movedim(d, -1).unsqueeze(-1)
    z = lo.movedim(d, -1).unsqueeze(-1)
    return _ungrouped(cg.to(dtype) * s.to(dtype) + z.to(dtype), d)


def fake_quantize_affine(
    x: torch.Tensor, bits: int, dim: int = -1, group_size: int | None = None
) -> torch.Tensor:
    """Quantize then dequantize (simulated quantization); same shape and dtype as ``x``.

    ``bits >= 16`` returns ``x`` unchanged.
    """
    if bits >= 16:
        return x
    codes, scale, lo = quantize_affine(x.float(), bits, dim, group_size)
    return dequantize_affine(codes, scale, lo, dim).to(x.dtype)


# -- non-uniform quantization (codebooks) ---------------------------------------------------------


def normalize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Map ``[lo, hi]`` to ``[-1, 1]`` (``lo``, ``hi`` broadcast against ``x``); values outside go outside."""
    return 2 * (x - lo) / (hi - lo).clamp_min(1e-8) - 1


def denormalize(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    return (y + 1) / 2 * (hi - lo).clamp_min(1e-8) + lo


def uniform_codebook(bits: int) -> torch.Tensor:
    """The uniform ``bits``-bit grid on ``[-1, 1]`` as a codebook ``(2**bits,)``."""
    return torch.linspace(-1, 1, 2**bits)


def signposts(codebook: torch.Tensor) -> torch.Tensor:
    """Decision boundaries of a sorted codebook ``(K,)``: the ``K - 1`` midpoints."""
    return (codebook[1:] + codebook[:-1]) / 2


def quantize_codebook(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid codes of ``y`` (any shape) against a sorted codebook ``(K,)``, K <= 256.

    A value exactly on a signpost goes to the lower centroid. Returns uint8 codes of ``y``'s shape.
    """
    return torch.bucketize(y, signposts(codebook).to(y.dtype)).to(torch.uint8)


def dequantize_codebook(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``codebook[codes]``: the centroid of every code."""
    return codebook[codes.long()]


def kmeans_1d(
    x: torch.Tensor, k: int, weights: torch.Tensor | None = None, max_iter: int = 300
) -> torch.Tensor:
    """Weighted 1-D k-means (Lloyd): minimise ``sum_i w_i (x_i - c(x_i))**2``.

    Exact Lloyd iterations done on sorted data: clusters are contiguous runs between signposts,
    so each step is ``k`` binary searches over prefix sums (float64) instead of an ``N x k``
    distance matrix. Initialised at the weighted ``(j + 0.5) / k`` quantiles; stops when the
    assignment no longer changes. A cluster that becomes empty keeps its centroid.

    Args:
        x: samples, any shape (flattened), e.g. normalized activations ``(N,)``.
        k: number of centroids (``2**bits``).
        weights: non-negative weights of ``x``'s shape (e.g. the diagonal Fisher information);
            ``None`` means plain k-means (all weights equal).

    Returns:
        Sorted centroids ``(k,)`` in ``x``'s dtype.
    """
    xs, order = x.detach().flatten().double().sort()
    if xs.numel() == 0:
        raise ValueError("kmeans_1d needs at least one sample")
    w = torch.ones_like(xs) if weights is None else weights.detach().flatten().double()[order]
    if (w < 0).any():
        raise ValueError("kmeans_1d weights must be non-negative")
    if w.sum() <= 0:
        w = torch.ones_like(xs)
    zero = xs.new_zeros(1)
    cw = torch.cat([zero, w.cumsum(0)])  # (N + 1,) prefix sums of weights
    cwx = torch.cat([zero, (w * xs).cumsum(0)])  # (N + 1,) prefix sums of weight * x
    targets = (torch.arange(k, dtype=torch.float64, device=xs.device) + 0.5) / k * cw[-1]
    c = xs[torch.searchsorted(cw[1:], targets).clamp_max(xs.numel() - 1)]  # weighted quantiles
    cuts = None
    for _ in range(max_iter):
        inner = torch.searchsorted(xs, signposts(c), right=True)  # x <= signpost -> lower cluster
        new_cuts = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), xs.numel())])
        if cuts is not None and torch.equal(new_cuts, cuts):
            break
        cuts = new_cuts
        sw = cw[cuts[1:]] - cw[cuts[:-1]]  # (k,) weight of each cluster
        swx = cwx[cuts[1:]] - cwx[cuts[:-1]]
        c = torch.where(sw > 0, swx / sw.clamp_min(1e-300), c).sort().values
    return c.to(x.dtype)


def q_norm(x_hat: torch.Tensor, x: torch.Tensor, dim=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Norm (KVQuant): the affine map ``a * x_hat + b`` whose output has ``x``'s mean and std.

    Quantizing to few centroids shifts the distribution; KVQuant corrects it by normalizing the
    quantized values to the original's mean and standard deviation. Applied to a codebook
    (``codebook * a + b``) the correction costs nothing at run time.

    Args:
        x_hat: quantize-dequantized values, same shape as ``x``.
        x: the original values.
        dim: axis (or axes) the moments are taken over; ``None`` for all elements (per layer).

    Returns:
        ``(a, b)`` with the moments' shape (``keepdim``), scalars for ``dim=None``.
    """
    dims = tuple(range(x.dim())) if dim is None else dim
    m, s = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    m_hat, s_hat = x_hat.mean(dims, keepdim=True), x_hat.std(dims, keepdim=True)
    a = s / s_hat.clamp_min(1e-12)
    b = m - a * m_hat
    return (a.squeeze(), b.squeeze()) if dim is None else (a, b)


# -- dense-and-sparse -----------------------------------------------------------------------------


def outliers_per_side(n: int, frac: float) -> int:
    """Outliers kept on each side of a slice of ``n`` elements: ``round(n * frac / 2)`` (half up)."""
    if not 0 <= frac < 1:
        raise ValueError(f"outlier fraction must be in [0, 1), got {frac}")
    return int(n * frac / 2 + 0.5)


def outlier_mask(x: torch.Tensor, frac: float, dim: int = -1) -> torch.Tensor:
    """Dense-and-sparse split: True at the ``k`` largest and ``k`` smallest values of every slice
    along ``dim`` (``k = outliers_per_side(n, frac)``, so exactly ``2k`` per slice, ties broken by
    ``topk``). Returns a bool tensor of ``x``'s shape."""
    k = outliers_per_side(x.shape[dim], frac)
    mask = torch.zeros_like(x, dtype=torch.bool)
    if k == 0:
        return mask
    mask.scatter_(dim, x.topk(k, dim).indices, True)
    mask.scatter_(dim, x.topk(k, dim, largest=False).indices, True)
    return mask


def outlier_thresholds(x: torch.Tensor, frac: float, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice thresholds of the split (for offline calibration): ``lo`` is the ``(k+1)``-th
    smallest and ``hi`` the ``(k+1)``-th largest value along ``dim``, so ``x < lo | x > hi`` is
    :func:`outlier_mask` when there are no ties, and ``[lo, hi]`` is the range of the dense part.
    Returns ``(lo, hi)`` with ``dim`` removed."""
    k = outliers_per_side(x.shape[dim], frac)
    if 2 * k >= x.shape[dim]:
        raise ValueError(f"outlier fraction {frac} leaves no dense values in slices of {x.shape[dim]}")
    hi = x.topk(k + 1, dim).values.select(dim, k)
    lo = x.topk(k + 1, dim, largest=False).values.select(dim, k)
    return lo, hi


def dense_sparse_split(x: torch.Tensor, frac: float, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = dense + sparse``: ``sparse`` holds the outliers of :func:`outlier_mask` (zeros
    elsewhere; stored as index + fp16 value), ``dense`` the rest (zeros at the outliers)."""
    mask = outlier_mask(x, frac, dim)
    return x.masked_fill(mask, 0), x * mask
