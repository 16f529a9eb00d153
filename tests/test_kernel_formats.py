"""The packed formats of issue 16 through the generic ``split_k`` path, under TRITON_INTERPRET=1 on a CPU:
per-token keys, channel shifts/scales, sparse value outliers (CSR), and the mixed-width stores of QoKV's
token groups (one store per width pair, token positions, empty slots). Each against the PyTorch reference
twin (within ``REL_TOL`` of tests/test_kernels_fast.py), and the reference against an independent dense
computation written here: quantize-dequantize by hand, then softmax attention."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from kvbench.kernels import ops, reference  # noqa: E402
from kvbench.kernels import triton as tk  # noqa: E402

REL_TOL = 2e-3


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _data(B=2, H=2, T=70, D=64, rep=4, seed=0):
    torch.manual_seed(seed)
    k = torch.randn(B, H, T, D) * 2 + torch.linspace(-3, 3, D)  # channel offsets: what a shift removes
    v = torch.randn(B, H, T, D)
    q = torch.randn(B, H * rep, D) * 2
    return q, k, v


def _chan(H, D, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.rand(H, D, generator=g) + 0.5, torch.randn(H, D, generator=g)])


def _fake_token(x, bits, group):
    """Per-token asymmetric min/max quantize-dequantize in groups of channels (fp16 scale and zero)."""
    B, H, T, D = x.shape
    xg = x.float().reshape(B, H, T, D // group, group)
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-5).half().float()
    z = lo.half().float()
    return (torch.clamp(torch.floor((xg - z) / s + 0.5), 0, 2**bits - 1) * s + z).reshape(x.shape)


def _dense_attention(q, k, v):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = torch.softmax(torch.einsum("bhd,bhtd->bht", q.float(), k.float()) * q.shape[-1] ** -0.5, -1)
    return torch.einsum("bht,bhtd->bhd", att, v.float())


def _check_triton(q, kv, **kw):
    ref = ops.decode_attention(q, kv, impl="reference")
    out = ops.decode_attention(q, kv, impl="triton", path="split_k", n_splits=2, tile=16, **kw)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < REL_TOL, _rel(out, ref)
    return ref


@pytest.mark.parametrize("bits,pre_rope", [(4, False), (3, True), (2, True)])
def test_token_keys_with_channel_affine(bits, pre_rope):
    """Per-token keys and values with channel (scale, shift): the kernel maps keys back in the tile and
    folds the value affine into the output; the reference equals quantize-dequantize by hand."""
    q, k, v = _data(seed=bits)
    H, D = k.shape[1], k.shape[-1]
    kc, vc = _chan(H, D, 1), _chan(H, D, 2)
    inv = reference.default_inv_freq(D) if pre_rope else None
    kv = ops.build_packed_kv(k, v, bits, bits, 32, 32, n_sink=2, n_recent=4, impl="reference", key_group=32,
                             k_chan=kc, v_chan=vc, inv_freq=inv)
    assert not kv.plain and tk.choose(q, kv)["path"] == "split_k"
    ref = _check_triton(q, kv)
    # independent: un-rotate, affine, quantize per token, affine back, rotate
    kp, vp = k[:, :, 2:66].clone(), v[:, :, 2:66]
    pos = torch.arange(2, 66)
    if pre_rope:
        kp = reference.rope_at(kp, pos, -inv)
    k_hat = _fake_token((kp - kc[1][:, None]) / kc[0][:, None], bits, 32) * kc[0][:, None] + kc[1][:, None]
    v_hat = _fake_token((vp - vc[1][:, None]) / vc[0][:, None], bits, 32) * vc[0][:, None] + vc[1][:, None]
    if pre_rope:
        k_hat = reference.rope_at(k_hat, pos, inv)
    dense = _dense_attention(q, torch.cat([k[:, :, :2], k_hat, k[:, :, 66:]], 2), torch.cat([v[:, :, :2], v_hat, v[:, :, 66:]], 2))
    assert _rel(ref, dense) < 1e-4


@pytest.mark.parametrize("key_group", [None, 16])
def test_value_outliers_csr(key_group):
    """KVQuant's per-token sparse value outliers (and per-token key outliers with per-token keys): CSR per
    key block, added to the value tile by the kernel; the reference keeps them exact."""
    q, k, v = _data(seed=3)
    v[0, 1, 10, 5] = 40.0  # an outlier far out of range
    kv = ops.build_packed_kv(k, v, 3, 3, 32, 16, n_sink=1, n_recent=5, impl="reference", key_group=key_group,
                             key_outlier_frac=0.02 if key_group else 0.0, value_outlier_frac=0.02)
    assert kv.vol_ptr is not None and int(kv.vol_ptr[:, :, -1].min()) > 0
    assert (kv.ol_ptr is not None) == (key_group is not None)
    _check_triton(q, kv)
    _, vals = reference.dequantize_all(kv)
    assert vals[0, 1, 10, 5] == pytest.approx(40.0, rel=1e-3)  # stored sparsely: exact up to fp16
    mask, _ = ops.token_outliers(v[:, :, 1:65], 0.02, 16)
    assert int(kv.vol_ptr[:, :, -1].sum()) == int(mask.sum())


@pytest.mark.parametrize("ol_chunk", [16, 64])
def test_outlier_chunks(ol_chunk):
    """KVQuant's layout (NUQ-free here, pre-RoPE keys, key outliers past per-channel thresholds, per-token value
    outliers) with many entries per key block: the kernel's loop over them, ``ol_chunk`` at a time (several
    steps, the last one partial), gives the reference twin's answer."""
    q, k, v = _data(seed=5)
    H, D = k.shape[1], k.shape[-1]
    th = torch.full((H, D), 1.0)  # most of these keys' entries lie past it: more than 1000 per block
    kv = ops.build_packed_kv(k, v, 4, 4, 32, 64, n_sink=0, n_recent=6, k_clamp=(-th, th),
                             inv_freq=reference.default_inv_freq(D), value_outlier_frac=0.1, impl="reference")
    for ptr in (kv.ol_ptr, kv.vol_ptr):  # entries per key block
        counts = ptr[:, :, 1:] - ptr[:, :, :-1]
        assert int(counts.min()) > 2 * 64 and bool((counts % 16 != 0).any())
    _check_triton(q, kv, ol_chunk=ol_chunk)
    for bad in (24, 8):  # one line, not a Triton compile error (8: on a GPU; the interpreter would run it)
        with pytest.raises(ValueError, match=f"ol_chunk must be a power of two of at least 16, got {bad}"):
            _check_triton(q, kv, ol_chunk=bad)


@pytest.mark.parametrize("pre_rope", [False, True])
def test_mixed_width_stores(pre_rope):
    """QoKV's token groups at different widths: one store per width pair with token positions (empty slots
    where the rows differ, a whole tile of them), read in one reduction; equal to the dense reference."""
    q, k, v = _data(B=2, T=3 + 64 + 2, seed=5)
    torch.manual_seed(1)
    groups = torch.randint(0, 3, (2, 64))
    groups[1, :40] = 2  # row 1: most tokens in the last group -> row 0 has a tile of empty slots there
    group_bits = [(4, 5), (4, 4), (2, 3)]
    H, D = k.shape[1], k.shape[-1]
    inv = reference.default_inv_freq(D) if pre_rope else None
    parts = ops.build_mixed_kv(k, v, groups, group_bits, n_sink=3, n_recent=2, key_block=16, key_group=64,
                               value_group=64, k_chan=_chan(H, D, 3), impl="reference", inv_freq=inv)
    assert len(parts) == 3 and all(p.positions is not None for p in parts)
    assert sum(int((p.positions >= 0).sum()) for p in parts) == 2 * 64
    keys, vals = reference.dequantize_all(parts)
    assert keys.shape == (2, H, 69, D)
    torch.testing.assert_close(keys[:, :, :3], k[:, :, :3].float())
    # the reference against the independent dense path: per-group quantize-dequantize by hand
    kc = _chan(H, D, 3)
    kp = reference.rope_at(k[:, :, 3:67], torch.arange(3, 67), -inv) if pre_rope else k[:, :, 3:67]
    y = (kp - kc[1][:, None]) / kc[0][:, None]
    k_hat, v_hat = torch.empty_like(y), torch.empty_like(y)
    for g, (kb, vb) in enumerate(group_bits):
        m = (groups == g)[:, None, :, None]
        k_hat = torch.where(m, _fake_token(y, kb, 64), k_hat)
        v_hat = torch.where(m, _fake_token(v[:, :, 3:67], vb, 64), v_hat)
    k_hat = k_hat * kc[0][:, None] + kc[1][:, None]
    if pre_rope:
        k_hat = reference.rope_at(k_hat, torch.arange(3, 67), inv)
    assert _rel(keys[:, :, 3:67], k_hat) < 1e-5 and _rel(vals[:, :, 3:67], v_hat) < 1e-5
    _check_triton(q, parts)
    assert tk.choose(q, parts)["path"] == "split_k"  # the dispatcher's choice for the list, as it decodes it
    with pytest.raises(ValueError, match="does not apply"):
        tk.choose(q, parts, "cuda_core")


def test_fast_paths_do_not_apply_to_the_new_formats():
    """Only split_k reads per-token keys, channel scales, value outliers and mixed-width stores: the fast paths'
    ``applies()`` is false for each, and forcing one is refused."""
    q, k, v = _data(B=1, H=1, T=64, rep=4)
    formats = [ops.build_packed_kv(k, v, 4, 4, 32, 64, impl="reference", key_group=64),
               ops.build_packed_kv(k, v, 4, 4, 32, 64, impl="reference", v_chan=_chan(1, 64, 0)),
               ops.build_packed_kv(k, v, 4, 4, 32, 64, impl="reference", value_outlier_frac=0.02)]
    for kv in formats:
        assert not kv.plain and tk.choose(q, kv)["path"] == "split_k"
        for name, path in tk.PATHS.items():
            assert path.applies(kv, 4) == (name == "split_k"), name
        with pytest.raises(ValueError, match="does not apply"):
            tk.choose(q, kv, "cuda_core")
