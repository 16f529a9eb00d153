"""A transformers ``Cache`` that stores K/V packed (the ``kv.backend=kernel`` path).

Per layer (``PackedLayer``) the cache keeps, for each batch row and KV head:

* the first ``sink_tokens`` tokens in the model dtype (post-RoPE keys);
* the packed store: ``key_bits`` / ``value_bits`` codes plus fp16 scales/zeros (see
  :mod:`kvbench.kernels`), optional NUQ codebooks and CSR key outliers; with ``pre_rope`` the keys
  are un-rotated before quantization and rotated back inside the decode kernel;
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


def _per_layer(x, i):
    return None if x is None else x[i]


def _lut(cb, H, D, device):
    if cb is None:
        return None
    cb = torch.as_tensor(cb).to(device=device, dtype=torch.float16)
    return cb.expand(H, D, cb.shape[-1]).contiguous()


class PackedLayer(DynamicLayer):
    """One layer's packed K/V (see the module docstring)."""

    is_croppable = False

    def __init__(self, spec: PackedCacheSpec, layer_idx: int, inv_freq: torch.Tensor | None, fused: bool):
        super().__init__()
        self.spec, self.layer_idx, self.fused = spec, layer_idx, fused
        self._inv_freq = inv_freq
        self.n_sink = self.n_packed = self.n_recent = 0
        self.mask_ok = None  # set by packed_attention_forward at the first fused decode step
        self.unit = 1 if spec.key_scales is not None else spec.key_block  # tokens packed at a time

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
        wk, wv = reference.words_per_token(s.key_bits, D), reference.words_per_token(s.value_bits, D)
        ng = D // s.value_group_size
        self.k_words, self.v_words = new(0, wk, torch.int32), new(0, wv, torch.int32)
        self.k_scale, self.k_zero = new(0, D, torch.float16), new(0, D, torch.float16)
        self.v_scale, self.v_zero = new(0, ng, torch.float16), new(0, ng, torch.float16)
        self.k_lut = _lut(_per_layer(s.key_codebooks, self.layer_idx), H, D, dev)
        self.v_lut = _lut(_per_layer(s.value_codebooks, self.layer_idx), H, D, dev)
        ks = _per_layer(s.key_scales, self.layer_idx)
        self.k_given = None if ks is None else tuple(torch.as_tensor(t).to(dev, torch.float16) for t in ks)
        th = _per_layer(s.key_outlier_thresholds, self.layer_idx)
        self.k_clamp = None if th is None else tuple(torch.as_tensor(t).to(dev, torch.float32) for t in th)
        if self.k_clamp is not None:
            self.ol_ptr = torch.zeros(B, H, 1, dtype=torch.int32, device=dev)
            self.ol_tok = torch.zeros(B, H, 0, dtype=torch.int32, device=dev)
            self.ol_ch = torch.zeros(B, H, 0, dtype=torch.int16, device=dev)
            self.ol_val = torch.zeros(B, H, 0, dtype=torch.float16, device=dev)
            self.ol_len = torch.zeros(B, H, dtype=torch.int64, device=dev)
        if self._inv_freq is not None:
            self._inv_freq = self._inv_freq.to(dev, torch.float32)
        self.keys = self.values = None  # DynamicLayer attributes, unused
        self.is_initialized = True

    def _stored(self) -> list[torch.Tensor]:
        names = ["sink_k", "sink_v", "recent_k", "recent_v", "k_words", "v_words", "k_scale", "k_zero",
                 "v_scale", "v_zero", "k_lut", "v_lut", "ol_ptr", "ol_tok", "ol_ch", "ol_val"]
        return [t for t in (getattr(self, n, None) for n in names) if t is not None]

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (allocated, capacity slack included)."""
        return sum(t.numel() * t.element_size() for t in self._stored())

    def _grow(self, n_tokens: int) -> None:
        """Make the packed store hold ``n_tokens`` (amortised: ~12.5 % slack, whole key blocks)."""
        kb = self.spec.key_block
        cap = self.k_words.shape[2]
        if n_tokens <= cap:
            return
        new_cap = -(-(n_tokens + n_tokens // 8) // kb) * kb

        def grow(t, n):
            out = torch.zeros(*t.shape[:2], n, *t.shape[3:], dtype=t.dtype, device=t.device)
            out[:, :, : t.shape[2]] = t
            return out

        self.k_words, self.v_words = grow(self.k_words, new_cap), grow(self.v_words, new_cap)
        self.v_scale, self.v_zero = grow(self.v_scale, new_cap), grow(self.v_zero, new_cap)
        self.k_scale, self.k_zero = grow(self.k_scale, new_cap // kb), grow(self.k_zero, new_cap // kb)
        if self.k_clamp is not None:
            ptr = torch.zeros(self.B, self.H, new_cap // kb + 1, dtype=torch.int32, device=self.device)
            ptr[:, :, : self.ol_ptr.shape[2]] = self.ol_ptr
            self.ol_ptr = ptr

    def _flush(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize and append ``k, v (B, H, n, D)``: ``n`` a multiple of ``self.unit`` tokens."""
        s, n = self.spec, k.shape[2]
        start = self.n_packed
        self._grow(start + n)
        kq = k
        if self._inv_freq is not None:
            pos = torch.arange(self.n_sink + start, self.n_sink + start + n, device=k.device)
            kq = reference.rope_at(k.float(), pos, -self._inv_freq)  # back to pre-RoPE
        lo, hi = self.k_clamp if self.k_clamp is not None else (None, None)
        gs, gz = self.k_given if self.k_given is not None else (None, None)
        # given scales: any block gives the same codes; the largest power of two dividing n (<= key_block)
        qb = min(n & -n, s.key_block) if self.k_given is not None else s.key_block
        kw, ks, kz = ops.quantize_pack_keys(kq, s.key_bits, qb, self.k_lut, lo, hi, gs, gz, impl=s.impl)
        vw, vs, vz = ops.quantize_pack_values(v, s.value_bits, s.value_group_size, self.v_lut, impl=s.impl)
        b0, b1 = start // s.key_block, -(-(start + n) // s.key_block)  # key blocks touched
        self.k_words[:, :, start : start + n], self.v_words[:, :, start : start + n] = kw, vw
        self.v_scale[:, :, start : start + n], self.v_zero[:, :, start : start + n] = vs, vz
        if self.k_given is not None:  # one copy of the calibrated scales per block
            self.k_scale[:, :, b0:b1], self.k_zero[:, :, b0:b1] = ks[:, :, :1], kz[:, :, :1]
        else:
            self.k_scale[:, :, b0:b1], self.k_zero[:, :, b0:b1] = ks, kz
        if self.k_clamp is not None:
            k_hat = reference.dequantize_keys(kw, ks, kz, s.key_bits, qb, self.k_lut)
            self._append_outliers(kq, k_hat, start, b0, b1)
        self.n_packed = start + n

    def _append_outliers(self, kq, k_hat, start, b0, b1) -> None:
        """Append the sparse part of packed tokens ``start ..`` and set the CSR offsets of blocks ``b0 .. b1 - 1``."""
        s, n = self.spec, kq.shape[2]
        mask, res = ops.split_outliers(kq.float(), k_hat, *self.k_clamp)
        counts, tok, ch, val, cnt = ops.outlier_csr(mask, res, 1, tok_offset=start)  # counts per token
        need = int((self.ol_len + cnt).max())
        if need >= self.ol_tok.shape[2]:  # keep the last slot free: padding entries are parked there
            cap = need + need // 4 + 16
            for name in ("ol_tok", "ol_ch", "ol_val"):
                old = getattr(self, name)
                new = torch.zeros(self.B, self.H, cap, dtype=old.dtype, device=self.device)
                new[:, :, : old.shape[2]] = old
                setattr(self, name, new)
        idx = self.ol_len[:, :, None] + torch.arange(tok.shape[2], device=self.device)  # (B, H, n_max)
        valid = torch.arange(tok.shape[2], device=self.device) < cnt[:, :, None]
        idx = torch.where(valid, idx, self.ol_tok.shape[2] - 1).clamp_max(self.ol_tok.shape[2] - 1)
        for name, src in (("ol_tok", tok), ("ol_ch", ch), ("ol_val", val)):
            dst = getattr(self, name)
            cur = torch.gather(dst, 2, idx)
            dst.scatter_(2, idx, torch.where(valid, src, cur))
        # ol_ptr[j]: outliers of the tokens before min(j * key_block, start + n)
        before = torch.cat([counts.new_zeros(*counts.shape[:2], 1), counts.cumsum(-1)], -1)  # (B, H, n + 1)
        ends = (torch.arange(b0 + 1, b1 + 1, device=self.device) * s.key_block).clamp_max(start + n) - start
        self.ol_ptr[:, :, b0 + 1 : b1 + 1] = (self.ol_len[:, :, None] + before[:, :, ends]).to(torch.int32)
        self.ol_len += cnt

    # ---------------------------------------------------------------- transformers API
    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``(B, H_kv, T, D)`` K/V; return the dequantized cache, or tagged new K/V (fused decode)."""
        prefill = not self.is_initialized
        if prefill:
            self.lazy_initialization(key_states, value_states)
        s = self.spec
        k, v = key_states, value_states
        take = min(s.sink_tokens - self.n_sink, k.shape[2])
        if take > 0:
            self.sink_k[:, :, self.n_sink : self.n_sink + take] = k[:, :, :take]
            self.sink_v[:, :, self.n_sink : self.n_sink + take] = v[:, :, :take]
            self.n_sink += take
            k, v = k[:, :, take:], v[:, :, take:]
        n_new, cap = k.shape[2], self.recent_k.shape[2]
        if self.n_recent + n_new <= cap and self.n_recent + n_new < s.recent_window + self.unit:
            self.recent_k[:, :, self.n_recent : self.n_recent + n_new] = k
            self.recent_v[:, :, self.n_recent : self.n_recent + n_new] = v
            self.n_recent += n_new
        else:
            ck = torch.cat([self.recent_k[:, :, : self.n_recent], k], 2)
            cv = torch.cat([self.recent_v[:, :, : self.n_recent], v], 2)
            n_flush = (ck.shape[2] - s.recent_window) // self.unit * self.unit
            if n_flush > 0:
                self._flush(ck[:, :, :n_flush], cv[:, :, :n_flush])
            rest = ck.shape[2] - n_flush
            self.recent_k[:, :, :rest] = ck[:, :, n_flush:]
            self.recent_v[:, :, :rest] = cv[:, :, n_flush:]
            self.n_recent = rest
        if prefill and s.full_prefill:  # kv.prefill=full: the prompt attends in full precision
            return key_states, value_states
        if self.fused and key_states.shape[2] == 1:
            key_states._kvbench_packed = self  # read by packed_attention_forward
            return key_states, value_states
        keys, values = reference.dequantize_all(self.packed_kv())
        return keys.to(self.dtype), values.to(self.dtype)

    def packed_kv(self) -> ops.PackedKV:
        """The current state as the kernels' :class:`~kvbench.kernels.ops.PackedKV`."""
        ol = self.k_clamp is not None
        return ops.PackedKV(
            self.k_words, self.k_scale, self.k_zero, self.v_words, self.v_scale, self.v_zero, self.n_packed,
            self.sink_k, self.sink_v, self.n_sink, self.recent_k, self.recent_v, self.n_recent,
            self.spec.key_bits, self.spec.value_bits, self.spec.key_block, self.k_lut, self.v_lut,
            self.ol_ptr if ol else None, self.ol_tok if ol else None, self.ol_ch if ol else None,
            self.ol_val if ol else None, self._inv_freq,
        )

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

    def nbytes_per_token(self) -> list[float]:
        """Measured bytes per cached token of one sequence, per layer (all KV heads, K and V, every stored
        tensor including sink/recent buffers and capacity slack), i.e. ``nbytes / (batch * seq_len)``.
        fp16 K/V would be ``2 * H_kv * head_dim * 2``."""
        return [lay.nbytes() / max(lay.get_seq_length() * lay.B, 1) if lay.is_initialized else 0.0
                for lay in self.layers]

    def nbytes(self) -> int:
        """Total bytes held by all layers."""
        return sum(lay.nbytes() for lay in self.layers)


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
    for bits in {spec.key_bits, spec.value_bits}:
        check_layout(bits, method.info.head_dim)
    enable_fused_decode(model)
    return lambda: make_packed_cache(model.config, spec)
