"""A transformers ``Cache`` that stores K/V packed (the ``kv.backend=kernel`` path).

Per layer (``PackedLayer``) the cache keeps, for each batch row and KV head:

* the first ``sink_tokens`` tokens in the model dtype (post-RoPE keys);
* the packed store: ``key_bits`` / ``value_bits`` codes plus fp16 scales/zeros (see
  :mod:`kvbench.kernels`), keys per channel (key blocks or calibrated ranges) or per token, optional
  NUQ codebooks and CSR key and value outliers; with ``pre_rope`` the keys are un-rotated before
  quantization and rotated back inside the decode kernel; with channel ``(scale, shift)`` the codes
  are of ``(x - shift) / scale``. With token groups of different widths (``group_bits``, QoKV) the
  layer holds one store per width pair, each token in its group's store with its position;
* a recent window in the model dtype: new tokens land there; whenever it holds
  ``recent_window + key_block`` tokens, the oldest ``key_block`` are quantized and packed. With
  calibrated ``key_scales`` no block statistics are needed: every token leaving the window is packed
  at once (the packed store may then end inside a key block, which the kernels mask), so the cache
  quantizes exactly the tokens the simulated backend does.

``update()`` returns the dequantized K/V of the whole cache for prefill (the simulated path does the
same). For one-token decode steps, when the model's attention implementation is
:data:`PACKED_ATTN` (:func:`enable_fused_decode`), ``update()`` only appends and returns the new
token's K/V tagged with the layer; :func:`packed_attention_forward` then runs the fused Triton decode
kernel on the packed store directly. With any other attention implementation every step gets the
dequantized cache (correct, slow, like transformers' QuantizedCache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.errors import UserError
from kvbench.kernels import ops, reference
from kvbench.registry import register

PACKED_ATTN = "kvbench_packed"


@dataclass
class PackedCacheSpec:
    """How a :class:`PackedCache` stores K/V.

    Attributes:
        key_bits, value_bits: code widths (1..8; 2/3/4 are the tested ones).
        value_group_size: channels sharing one value (scale, zero); divides head_dim. ``head_dim``
            (one scale per token and head) enables the fastest decode kernel.
        key_block: tokens sharing one key (scale, zero) per channel; also the flush unit, unless
            ``key_scales`` are given (then tokens are packed one by one and each block stores a
            copy of the calibrated scales).
        sink_tokens: first tokens kept in the model dtype.
        recent_window: newest tokens kept in the model dtype (the window holds between
            ``recent_window`` and ``recent_window + key_block - 1`` tokens once flushing starts).
        pre_rope: quantize keys before RoPE (un-rotated on append, rotated in the decode kernel).
        key_codebooks, value_codebooks: optional per-layer NUQ codebooks in the code domain, each
            ``(2**bits,)``, ``(D, 2**bits)`` or ``(H_kv, D, 2**bits)`` (see
            :func:`kvbench.kernels.ops.codebook_from_unit`).
        key_scales: optional per-layer calibrated ``(scale, zero)``, each ``(H_kv, D)``.
        key_outlier_thresholds: optional per-layer ``(lo, hi)``, each ``(H_kv, D)``: keys outside
            are stored sparsely (dense-and-sparse).
        inv_freq: RoPE inverse frequencies ``(D/2,)`` for ``pre_rope`` (default: from the config).
        impl: ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` or ``"reference"`` kernels
            (``kv.kernel.impl``).
        path: Triton decode path, ``"auto"`` or a name in :data:`kvbench.kernels.triton.PATHS`
            (``kv.kernel.path``).
        full_prefill: ``kv.prefill=full``: the first update (the prefill) returns its K/V as given
            (full precision) to attention; they are stored packed all the same.
        key_axis: ``"channel"`` (ranges per channel over key blocks, or ``key_scales``) or ``"token"``
            (one range per token and ``key_group_size`` channels, like the values; packed token by token).
        key_group_size: channels per key range with ``key_axis="token"``.
        key_outlier_frac, value_outlier_frac: per-token dense-and-sparse split (KVQuant): the top and
            bottom ``frac / 2`` of each token over all heads and channels are stored sparsely (CSR per
            key block), the rest quantized on its own range (keys: with ``key_axis="token"``).
        key_channel, value_channel: optional per-layer channel ``(scale, shift)``, each ``(H_kv, D)`` or
            ``None``: the cache stores codes of ``(x - shift) / scale`` (QoKV's balancing); the decode
            kernel maps keys back in its tile and folds the values' affine into its output.
        group_bits: optional ``(key_bits, value_bits)`` of each token group (QoKV): the layer keeps one
            store per distinct pair, each token in its group's store with its position.
        token_groups: with ``group_bits``, ``f(keys (B, H_kv, n, D), layer, ctx) -> (B, n)`` group of
            every token about to be packed (``ctx``: a :class:`kvbench.method.KVContext` with the layer's
            queries of the current forward and all its keys so far).
    """

    key_bits: int = 4
    value_bits: int = 4
    value_group_size: int = 128
    key_block: int = 128
    sink_tokens: int = 0
    recent_window: int = 128
    pre_rope: bool = False
    key_codebooks: list | None = None
    value_codebooks: list | None = None
    key_scales: list | None = None
    key_outlier_thresholds: list | None = None
    inv_freq: torch.Tensor | None = None
    impl: str = "auto"
    path: str = "auto"
    full_prefill: bool = False
    key_axis: str = "channel"
    key_group_size: int = 128
    key_outlier_frac: float = 0.0
    value_outlier_frac: float = 0.0
    key_channel: list | None = None
    value_channel: list | None = None
    group_bits: list | None = None
    token_groups: Callable | None = None

    def widths(self) -> set[int]:
        """Every code width the cache stores."""
        pairs = self.group_bits or [(self.key_bits, self.value_bits)]
        return {int(b) for pair in pairs for b in pair}


def _per_layer(x, i):
    return None if x is None else x[i]


def _lut(cb, H, D, device, bits):
    if isinstance(cb, dict):  # one codebook per width (mixed widths)
        cb = cb.get(bits)
    if cb is None:
        return None
    cb = torch.as_tensor(cb).to(device=device, dtype=torch.float16)
    return cb.expand(H, D, cb.shape[-1]).contiguous()


def _chan(pair, H, D, device):
    """``(2, H, D)`` fp32 channel (scale, shift) of a layer, or None."""
    if pair is None:
        return None
    scale, shift = pair
    one = torch.ones(H, D, device=device)
    return torch.stack([one if scale is None else torch.as_tensor(scale).to(device, torch.float32),
                        0 * one if shift is None else torch.as_tensor(shift).to(device, torch.float32)]).contiguous()


class _Store:
    """The packed tokens of one ``(key_bits, value_bits)`` pair of a layer: codes, fp16 scales/zeros, the
    optional CSR outliers (keys ``ol_*``, values ``vol_*``) and, in a mixed-width layer, every token's
    position. ``n`` slots are used in every batch row (a row's surplus slots have position ``-1``)."""

    def __init__(self, spec: PackedCacheSpec, layer_idx: int, bits: tuple[int, int], shape, device, mixed: bool):
        s = spec
        B, H, D = shape
        self.spec, self.B, self.H, self.D, self.device = s, B, H, D, device
        self.key_bits, self.value_bits = bits
        self.token_keys = s.key_axis == "token"
        new = lambda t, w, dt: torch.zeros(B, H, t, w, dtype=dt, device=device)  # noqa: E731
        wk, wv = reference.words_per_token(self.key_bits, D), reference.words_per_token(self.value_bits, D)
        ngk = D // s.key_group_size if self.token_keys else D
        self.k_words, self.v_words = new(0, wk, torch.int32), new(0, wv, torch.int32)
        self.k_scale, self.k_zero = new(0, ngk, torch.float16), new(0, ngk, torch.float16)
        self.v_scale, self.v_zero = new(0, D // s.value_group_size, torch.float16), new(0, D // s.value_group_size, torch.float16)
        self.k_lut = _lut(_per_layer(s.key_codebooks, layer_idx), H, D, device, self.key_bits)
        self.v_lut = _lut(_per_layer(s.value_codebooks, layer_idx), H, D, device, self.value_bits)
        ks = _per_layer(s.key_scales, layer_idx)
        self.k_given = None if ks is None else tuple(torch.as_tensor(t).to(device, torch.float16) for t in ks)
        th = _per_layer(s.key_outlier_thresholds, layer_idx)
        self.k_clamp = None if th is None else tuple(torch.as_tensor(t).to(device, torch.float32) for t in th)
        self.positions = torch.full((B, 0), -1, dtype=torch.int32, device=device) if mixed else None
        self.sparse = [p for p, on in (("ol", self.k_clamp is not None or (self.token_keys and s.key_outlier_frac > 0)),
                                       ("vol", s.value_outlier_frac > 0)) if on]
        for p in self.sparse:
            setattr(self, f"{p}_ptr", torch.zeros(B, H, 1, dtype=torch.int32, device=device))
            setattr(self, f"{p}_tok", torch.zeros(B, H, 0, dtype=torch.int32, device=device))
            setattr(self, f"{p}_ch", torch.zeros(B, H, 0, dtype=torch.int16, device=device))
            setattr(self, f"{p}_val", torch.zeros(B, H, 0, dtype=torch.float16, device=device))
            setattr(self, f"{p}_len", torch.zeros(B, H, dtype=torch.int64, device=device))
        self.n = 0
        self.n_len = torch.zeros(1, dtype=torch.int64, device=device)  # n on the GPU: the kernels read it

    def tensors(self, used: bool = False) -> list[torch.Tensor]:
        """Every stored tensor; ``used``: only the parts holding the ``n`` tokens (and their key blocks and
        sparse entries), without the capacity kept for later tokens."""
        n, nb = self.n, -(-self.n // self.spec.key_block)
        per_token = {"k_words": n, "v_words": n, "v_scale": n, "v_zero": n, "k_scale": n if self.token_keys else nb,
                     "k_zero": n if self.token_keys else nb,
                     **{f"{p}_{f}": int(getattr(self, f"{p}_len").max()) for p in self.sparse
                        for f in ("tok", "ch", "val")}, **{f"{p}_ptr": nb + 1 for p in self.sparse}}
        out = [t if not used or name not in per_token else t[:, :, : per_token[name]]
               for name, t in ((m, getattr(self, m)) for m in ("k_words", "v_words", "k_scale", "k_zero", "v_scale",
                               "v_zero", *(f"{p}_{f}" for p in self.sparse for f in ("ptr", "tok", "ch", "val"))))]
        out += [t for t in (self.k_lut, self.v_lut) if t is not None]
        if self.positions is not None:
            out.append(self.positions[:, :n] if used else self.positions)
        return out

    def _grow(self, n_tokens: int) -> None:
        """Make the store hold ``n_tokens`` (amortised: ~12.5 % slack, whole key blocks)."""
        kb = self.spec.key_block
        cap = self.k_words.shape[2]
        if n_tokens <= cap:
            return
        new_cap = -(-(n_tokens + n_tokens // 8) // kb) * kb

        def grow(t, n, fill=0):
            out = torch.full((*t.shape[:2], n, *t.shape[3:]), fill, dtype=t.dtype, device=t.device)
            out[:, :, : t.shape[2]] = t
            return out

        self.k_words, self.v_words = grow(self.k_words, new_cap), grow(self.v_words, new_cap)
        self.v_scale, self.v_zero = grow(self.v_scale, new_cap), grow(self.v_zero, new_cap)
        nk = new_cap if self.token_keys else new_cap // kb
        self.k_scale, self.k_zero = grow(self.k_scale, nk), grow(self.k_zero, nk)
        if self.positions is not None:
            self.positions = grow(self.positions[:, None], new_cap, -1)[:, 0]
        for p in self.sparse:
            ptr = getattr(self, f"{p}_ptr")
            setattr(self, f"{p}_ptr", grow(ptr.unsqueeze(-1), new_cap // kb + 1).squeeze(-1))

    def append(self, kq: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Quantize and append ``kq, v (B, H, n, D)`` (keys as stored: pre-RoPE / channel-scaled where the
        format says so); ``positions (B, n)`` in a mixed-width layer."""
        s, n = self.spec, kq.shape[2]
        start = self.n
        self._grow(start + n)
        b0, b1 = start // s.key_block, -(-(start + n) // s.key_block)  # key blocks touched
        k_mask = v_mask = None
        if self.token_keys:
            kin = kq
            if s.key_outlier_frac > 0:
                k_mask, kin = ops.token_outliers(kq, s.key_outlier_frac, s.key_group_size)
            kw, ks, kz = ops.quantize_pack_values(kin, self.key_bits, s.key_group_size, self.k_lut, impl=s.impl)
            self.k_scale[:, :, start : start + n], self.k_zero[:, :, start : start + n] = ks, kz
        else:
            lo, hi = self.k_clamp if self.k_clamp is not None else (None, None)
            gs, gz = self.k_given if self.k_given is not None else (None, None)
            # given scales: any block gives the same codes; the largest power of two dividing n (<= key_block)
            qb = min(n & -n, s.key_block) if self.k_given is not None else s.key_block
            kw, ks, kz = ops.quantize_pack_keys(kq, self.key_bits, qb, self.k_lut, lo, hi, gs, gz, impl=s.impl)
            if self.k_given is not None:  # one copy of the calibrated scales per block
                self.k_scale[:, :, b0:b1], self.k_zero[:, :, b0:b1] = ks[:, :, :1], kz[:, :, :1]
            else:
                self.k_scale[:, :, b0:b1], self.k_zero[:, :, b0:b1] = ks, kz
            if self.k_clamp is not None:
                k_hat = reference.dequantize_keys(kw, ks, kz, self.key_bits, qb, self.k_lut)
                k_mask, _ = ops.split_outliers(kq.float(), k_hat, lo, hi)
        vin = v
        if s.value_outlier_frac > 0:
            v_mask, vin = ops.token_outliers(v, s.value_outlier_frac, s.value_group_size)
        vw, vs, vz = ops.quantize_pack_values(vin, self.value_bits, s.value_group_size, self.v_lut, impl=s.impl)
        self.k_words[:, :, start : start + n], self.v_words[:, :, start : start + n] = kw, vw
        self.v_scale[:, :, start : start + n], self.v_zero[:, :, start : start + n] = vs, vz
        if positions is not None:
            self.positions[:, start : start + n] = positions
        if k_mask is not None:
            if self.token_keys:
                k_hat = reference.dequantize_values(kw, ks, kz, self.key_bits, self.k_lut)
            self._append_sparse("ol", k_mask, (kq.float() - k_hat).half(), start, b0, b1)
        if v_mask is not None:
            v_hat = reference.dequantize_values(vw, vs, vz, self.value_bits, self.v_lut)
            self._append_sparse("vol", v_mask, (v.float() - v_hat).half(), start, b0, b1)
        self.n = start + n
        self.n_len.fill_(self.n)

    def _append_sparse(self, p: str, mask, res, start, b0, b1) -> None:
        """Append the sparse entries ``res[mask]`` of tokens ``start ..`` to the CSR ``p`` (``"ol"``: keys,
        ``"vol"``: values) and set the offsets of key blocks ``b0 .. b1 - 1``."""
        s, n = self.spec, mask.shape[2]
        counts, tok, ch, val, cnt = ops.outlier_csr(mask, res, 1, tok_offset=start)  # counts per token
        length = getattr(self, f"{p}_len")
        need = int((length + cnt).max())
        if need >= getattr(self, f"{p}_tok").shape[2]:  # keep the last slot free: padding entries are parked there
            cap = need + need // 4 + 16
            for f in ("tok", "ch", "val"):
                old = getattr(self, f"{p}_{f}")
                new = torch.zeros(self.B, self.H, cap, dtype=old.dtype, device=self.device)
                new[:, :, : old.shape[2]] = old
                setattr(self, f"{p}_{f}", new)
        last = getattr(self, f"{p}_tok").shape[2] - 1
        idx = length[:, :, None] + torch.arange(tok.shape[2], device=self.device)  # (B, H, n_max)
        valid = torch.arange(tok.shape[2], device=self.device) < cnt[:, :, None]
        idx = torch.where(valid, idx, last).clamp_max(last)
        for f, src in (("tok", tok), ("ch", ch), ("val", val)):
            dst = getattr(self, f"{p}_{f}")
            cur = torch.gather(dst, 2, idx)
            dst.scatter_(2, idx, torch.where(valid, src, cur))
        # ptr[j]: entries of the tokens before min(j * key_block, start + n)
        before = torch.cat([counts.new_zeros(*counts.shape[:2], 1), counts.cumsum(-1)], -1)  # (B, H, n + 1)
        ends = (torch.arange(b0 + 1, b1 + 1, device=self.device) * s.key_block).clamp_max(start + n) - start
        getattr(self, f"{p}_ptr")[:, :, b0 + 1 : b1 + 1] = (length[:, :, None] + before[:, :, ends]).to(torch.int32)
        length += cnt

    def packed_kv(self, layer: "PackedLayer", first: bool) -> ops.PackedKV:
        """This store as the kernels' :class:`~kvbench.kernels.ops.PackedKV` (the layer's sink and recent
        tokens in the ``first`` store only)."""
        ol, vol = "ol" in self.sparse, "vol" in self.sparse
        return ops.PackedKV(
            self.k_words, self.k_scale, self.k_zero, self.v_words, self.v_scale, self.v_zero, self.n,
            layer.sink_k, layer.sink_v, layer.n_sink if first else 0,
            layer.recent_k, layer.recent_v, layer.n_recent if first else 0,
            self.key_bits, self.value_bits, self.spec.key_block, self.k_lut, self.v_lut,
            self.ol_ptr if ol else None, self.ol_tok if ol else None, self.ol_ch if ol else None,
            self.ol_val if ol else None, layer._inv_freq, key_axis=self.spec.key_axis, positions=self.positions,
            k_chan=layer.k_chan, v_chan=layer.v_chan,
            vol_ptr=self.vol_ptr if vol else None, vol_tok=self.vol_tok if vol else None,
            vol_ch=self.vol_ch if vol else None, vol_val=self.vol_val if vol else None,
            recent_len=layer.recent_len if first else None, packed_len=self.n_len,
        )


class PackedLayer(DynamicLayer):
    """One layer's packed K/V (see the module docstring)."""

    is_croppable = False

    def __init__(self, spec: PackedCacheSpec, layer_idx: int, inv_freq: torch.Tensor | None, fused: bool):
        super().__init__()
        self.spec, self.layer_idx, self.fused = spec, layer_idx, fused
        self._inv_freq = inv_freq
        self.n_sink = self.n_packed = self.n_recent = 0
        self.mask_ok = None  # set by packed_attention_forward at the first fused decode step
        self.pending_rope = self.query = None  # the current forward's rotary tables and queries (set by hooks)
        token_by_token = spec.key_scales is not None or spec.key_axis == "token"
        self.unit = 1 if token_by_token else spec.key_block  # tokens packed at a time
        if spec.group_bits and not token_by_token:
            raise ValueError("mixed widths need keys packed token by token (key_axis='token' or key_scales)")

    # ---------------------------------------------------------------- storage
    def lazy_initialization(self, key_states, value_states) -> None:
        s = self.spec
        B, H, _, D = key_states.shape
        self.dtype, self.device, self.B, self.H, self.D = key_states.dtype, key_states.device, B, H, D
        dev = self.device
        new = lambda t, w, dt: torch.zeros(B, H, t, w, dtype=dt, device=dev)  # noqa: E731
        self.sink_k, self.sink_v = new(s.sink_tokens, D, self.dtype), new(s.sink_tokens, D, self.dtype)
        cap_r = s.recent_window + self.unit
        self.recent_k, self.recent_v = new(cap_r, D, self.dtype), new(cap_r, D, self.dtype)
        self.recent_len = torch.zeros(1, dtype=torch.int64, device=dev)  # n_recent on the GPU: kernels read it
        self.k_chan = _chan(_per_layer(s.key_channel, self.layer_idx), H, D, dev)
        self.v_chan = _chan(_per_layer(s.value_channel, self.layer_idx), H, D, dev)
        groups = [tuple(map(int, g)) for g in s.group_bits] if s.group_bits else [(s.key_bits, s.value_bits)]
        pairs = sorted(set(groups))
        self.store_of_group = [pairs.index(g) for g in groups]  # token group -> its store
        self.stores = [_Store(s, self.layer_idx, pair, (B, H, D), dev, len(pairs) > 1) for pair in pairs]
        if self._inv_freq is not None:
            self._inv_freq = self._inv_freq.to(dev, torch.float32)
        self.keys = self.values = None  # DynamicLayer attributes, unused
        self.is_initialized = True

    def _stored(self, used: bool = False) -> list[torch.Tensor]:
        own = [self.sink_k, self.sink_v, self.recent_k, self.recent_v]
        if used:
            own = [t[:, :, :n] for t, n in zip(own, (self.n_sink, self.n_sink, self.n_recent, self.n_recent))]
        own += [t for t in (self.k_chan, self.v_chan) if t is not None]
        return own + [t for st in self.stores for t in st.tensors(used)]

    def nbytes(self, used: bool = True) -> int:
        """Bytes of the tensors this layer holds: the parts that hold its tokens (``used``), or everything
        allocated (capacity for later tokens included)."""
        return sum(t.numel() * t.element_size() for t in self._stored(used))

    def _flush(self, k: torch.Tensor, v: torch.Tensor, ctx=None) -> None:
        """Quantize and append ``k, v (B, H, n, D)`` (post-RoPE, as the model gives them): ``n`` a multiple of
        ``self.unit`` tokens. With token groups each token goes to its group's store."""
        start = self.n_packed
        n = k.shape[2]
        kq = k
        if self._inv_freq is not None:
            pos = torch.arange(self.n_sink + start, self.n_sink + start + n, device=k.device)
            kq = reference.rope_at(k.float(), pos, -self._inv_freq)  # back to pre-RoPE
        if self.k_chan is not None:
            kq = (kq.float() - self.k_chan[1][:, None]) / self.k_chan[0][:, None]
        vq = v if self.v_chan is None else (v.float() - self.v_chan[1][:, None]) / self.v_chan[0][:, None]
        groups = None if self.spec.token_groups is None else self.spec.token_groups(k, self.layer_idx, ctx)
        if len(self.stores) == 1:
            self.stores[0].append(kq, vq)
        else:
            B, H, _, D = k.shape
            for j, store in enumerate(self.stores):
                sel = torch.zeros_like(groups, dtype=torch.bool)
                for g, sj in enumerate(self.store_of_group):
                    if sj == j:
                        sel |= groups == g
                if not sel.any():
                    continue
                idx, pos = ops.select_tokens(sel, self.n_sink + start)  # (B, m)
                at = idx[:, None, :, None].expand(B, H, idx.shape[1], D)
                store.append(torch.gather(kq, 2, at), torch.gather(vq, 2, at), pos)
        self.n_packed = start + n

    def _context(self, new_k: torch.Tensor, n_new: int, query):
        """What a token-group decision sees (as the simulated cache gives it): the queries of this forward
        and every key so far (post-RoPE; packed ones dequantized), the new ones last."""
        from kvbench.method import KVContext

        keys = torch.cat([reference.dequantize_all(self.packed_kv())[0].to(new_k.dtype), new_k], 2)
        return KVContext(start=self.n_sink + self.n_packed, query=query, query_start=keys.shape[2] - n_new, keys=keys)

    # ---------------------------------------------------------------- transformers API
    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``(B, H_kv, T, D)`` K/V; return the dequantized cache, or tagged new K/V (fused decode)."""
        prefill = not self.is_initialized
        if prefill:
            self.lazy_initialization(key_states, value_states)
        s = self.spec
        k, v = key_states, value_states
        query, self.query, self.pending_rope = self.query, None, None  # this forward's, read once
        take = min(s.sink_tokens - self.n_sink, k.shape[2])
        if take > 0:
            self.sink_k[:, :, self.n_sink : self.n_sink + take] = k[:, :, :take]
            self.sink_v[:, :, self.n_sink : self.n_sink + take] = v[:, :, :take]
            self.n_sink += take
            k, v = k[:, :, take:], v[:, :, take:]
        n_new = k.shape[2]
        if n_new == 1 and self.appends_in_place(1):  # a decode step: GPU ops only (a CUDA graph can replay it)
            self.recent_k.index_copy_(2, self.recent_len, k)
            self.recent_v.index_copy_(2, self.recent_len, v)
            self.recent_len += 1
            self.n_recent += 1
        elif self.appends_in_place(n_new):
            self.recent_k[:, :, self.n_recent : self.n_recent + n_new] = k
            self.recent_v[:, :, self.n_recent : self.n_recent + n_new] = v
            self.n_recent += n_new
            self.recent_len.fill_(self.n_recent)
        else:
            ck = torch.cat([self.recent_k[:, :, : self.n_recent], k], 2)
            cv = torch.cat([self.recent_v[:, :, : self.n_recent], v], 2)
            n_flush = (ck.shape[2] - s.recent_window) // self.unit * self.unit
            if n_flush > 0:
                ctx = self._context(k, key_states.shape[2], query) if s.token_groups is not None else None
                self._flush(ck[:, :, :n_flush], cv[:, :, :n_flush], ctx)
            rest = ck.shape[2] - n_flush
            self.recent_k[:, :, :rest] = ck[:, :, n_flush:]
            self.recent_v[:, :, :rest] = cv[:, :, n_flush:]
            self.n_recent = rest
            self.recent_len.fill_(rest)
        if prefill and s.full_prefill:  # kv.prefill=full: the prompt attends in full precision
            return key_states, value_states
        if self.fused and key_states.shape[2] == 1:
            key_states._kvbench_packed = self  # read by packed_attention_forward
            return key_states, value_states
        keys, values = reference.dequantize_all(self.packed_kv())
        return keys.to(self.dtype), values.to(self.dtype)

    def appends_in_place(self, n_new: int) -> bool:
        """True when ``n_new`` more tokens past the sink only land in the recent window (no flush: the packed
        store and every buffer stay where they are)."""
        s = self.spec
        return self.n_recent + n_new <= self.recent_k.shape[2] and self.n_recent + n_new < s.recent_window + self.unit

    def packed_kv(self) -> ops.PackedKV | list[ops.PackedKV]:
        """The current state as the kernels' :class:`~kvbench.kernels.ops.PackedKV` (a list of them, one per
        store, with mixed widths)."""
        parts = [st.packed_kv(self, j == 0) for j, st in enumerate(self.stores)]
        return parts[0] if len(parts) == 1 else parts

    def attend(self, q: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
        """Fused decode attention of ``q (B, H_q, D)`` over this layer; returns ``(B, H_q, D)``."""
        return ops.decode_attention(q, self.packed_kv(), scaling, impl=self.spec.impl, path=self.spec.path)

    def get_seq_length(self) -> int:
        return self.n_sink + self.n_packed + self.n_recent

    def reset(self) -> None:
        self.is_initialized = False
        self.n_sink = self.n_packed = self.n_recent = 0
        self.mask_ok = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the packed KV cache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the packed KV cache does not support beam search / batch expansion")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the packed KV cache does not support batch selection")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("the packed KV cache does not support beam search")

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class PackedCache(Cache):
    """A ``Cache`` of :class:`PackedLayer` (build it with :func:`make_packed_cache`)."""

    def __init__(self, layers: list[PackedLayer]):
        super().__init__(layers=layers)

    def decode_step_replayable(self) -> bool:
        """True when the next one-token step only appends to every layer's recent window (sinks full, no flush):
        GPU work with the counts on the GPU, which a CUDA graph captured at an earlier step with the same
        :meth:`graph_key` replays correctly (see :mod:`kvbench.cache.graphs`)."""
        return all(lay.is_initialized and lay.fused and lay.n_sink == lay.spec.sink_tokens and lay.appends_in_place(1)
                   for lay in self.layers)

    def graph_key(self) -> tuple:
        """What a captured decode step bakes in besides the counts the kernels read from the GPU: the address and
        shape of every tensor the layers hold (a store that grows moves), and the packed counts of the stores
        whose launches take more than capacities from the host (sparse outliers, mixed widths)."""
        return tuple((tuple((t.data_ptr(), tuple(t.shape)) for t in lay._stored()),
                      tuple(st.n for st in lay.stores if st.sparse or st.positions is not None))
                     for lay in self.layers if lay.is_initialized)

    def replayed_decode_step(self) -> None:
        """Advance the host-side counts as a replayed one-token step advanced those on the GPU."""
        for lay in self.layers:
            lay.n_recent += 1

    def nbytes_per_token(self, used: bool = True) -> list[float]:
        """Measured bytes per cached token of one sequence, per layer (all KV heads, K and V: codes, scales,
        codebooks, outliers, token positions, channel scales, sink and recent tokens), i.e.
        ``nbytes / (batch * seq_len)``; ``used=False``: everything allocated (capacity kept for later tokens
        included). fp16 K/V would be ``2 * H_kv * head_dim * 2``."""
        return [lay.nbytes(used) / max(lay.get_seq_length() * lay.B, 1) if lay.is_initialized else 0.0
                for lay in self.layers]

    def nbytes(self, used: bool = True) -> int:
        """Total bytes held by all layers (see :meth:`nbytes_per_token`)."""
        return sum(lay.nbytes(used) for lay in self.layers)


def _inv_freq(cfg, spec: PackedCacheSpec) -> torch.Tensor:
    if spec.inv_freq is not None:
        return torch.as_tensor(spec.inv_freq, dtype=torch.float32)
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rp.get("rope_type", "default")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if rope_type == "default":
        return reference.default_inv_freq(head_dim, rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    if scaling != 1.0:
        raise ValueError(f"pre_rope keys with rope_type={rope_type!r} (attention scaling {scaling}) are not supported")
    return inv_freq.float()


def make_packed_cache(model_config, spec: PackedCacheSpec) -> PackedCache:
    """Build the packed cache for a model (the patch layer's entry point).

    Args:
        model_config: the model's ``PretrainedConfig`` (its text config is used).
        spec: storage settings.

    Returns:
        A :class:`PackedCache` with one :class:`PackedLayer` per decoder layer; fused decode is on
        when ``model_config._attn_implementation == PACKED_ATTN`` (see :func:`enable_fused_decode`).

    Raises:
        RuntimeError: ``spec.impl == "triton"`` without a CUDA GPU or ``TRITON_INTERPRET=1``.
    """
    if spec.impl == "triton":
        ops.require_triton()
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    inv_freq = _inv_freq(cfg, spec) if spec.pre_rope else None
    fused = getattr(model_config, "_attn_implementation", None) == PACKED_ATTN
    return PackedCache([PackedLayer(spec, i, inv_freq, fused) for i in range(cfg.num_hidden_layers)])


def _all_visible(mask) -> bool:
    if mask is None:
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function for :data:`PACKED_ATTN`: fused packed decode, SDPA otherwise.

    Args:
        query: ``(B, H_q, T_q, D)``; key/value: ``(B, H_kv, T_kv, D)`` as the cache returned them.

    Returns:
        ``(attn_output (B, T_q, H_q, D), None)`` like transformers' SDPA attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(key, "_kvbench_packed", None)
    if layer is not None and layer.mask_ok is None:
        # decided once per generation (one host sync): in generate() the padding pattern of the
        # prompt is fixed and new tokens are always visible, so later steps cannot change the answer
        layer.mask_ok = _all_visible(attention_mask)
    if layer is not None and not layer.mask_ok:
        keys, values = reference.dequantize_all(layer.packed_kv())  # padded batch: masked slow path
        key, value, layer = keys.to(query.dtype), values.to(query.dtype), None
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    out = layer.attend(query[:, :, 0], scaling)  # (B, H_q, D)
    return out[:, None], None


def register_packed_attention() -> str:
    """Register :func:`packed_attention_forward` (and the SDPA mask) under :data:`PACKED_ATTN`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTN, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTN, sdpa_mask)
    return PACKED_ATTN


def enable_fused_decode(model) -> None:
    """Switch ``model`` to :data:`PACKED_ATTN` so that packed caches decode with the fused kernel."""
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTN)


def check_layout(bits: int, head_dim: int) -> None:
    """One-line refusal of a code width the packed layout cannot hold for this head_dim."""
    try:
        reference.bit_slices(bits, head_dim)
    except ValueError as e:
        raise UserError(f"kv.backend=kernel cannot pack kv.bits={bits} here: {e}") from None


@register("cache backend", "kernel")
def packed_cache(model, method, n_layers: int, kernel=None, prefill: str = "quantized"):
    """``kv.backend=kernel``: a fresh :class:`PackedCache` in ``method.packed_spec()``'s format per forward.

    The shared components (``method.sink_tokens``, ``method.recent_window``) and the kernel choice
    (``kv.kernel``: ``impl``, ``path``) and ``kv.prefill`` are applied here, once for every method.
    """
    from kvbench.kernels.ops import BACKEND_ERROR, resolve_impl, triton_available
    from kvbench.registry import plugins, unknown_name_error

    kernel = kernel if kernel is not None else method.kv.kernel
    impl = resolve_impl(str(kernel.impl), next(model.parameters()).device)
    if impl == "triton" and not triton_available():
        raise UserError(BACKEND_ERROR + "; or set kv.kernel.impl=reference")
    if impl == "triton" and kernel.path != "auto" and kernel.path not in plugins("kernel path"):
        raise unknown_name_error("kv.kernel.path", kernel.path, ["auto", *plugins("kernel path")])
    spec = dataclasses.replace(method.packed_spec(), impl=impl, path=kernel.path,
                               sink_tokens=method.cfg.sink_tokens, recent_window=method.cfg.recent_window,
                               full_prefill=prefill == "full")
    for bits in spec.widths():
        check_layout(bits, method.info.head_dim)
    enable_fused_decode(model)
    return lambda spans=None: make_packed_cache(model.config, spec)  # padded rows share blocks: see validate.py
