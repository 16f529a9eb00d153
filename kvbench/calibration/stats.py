"""Calibration statistics: K/V activations (pre- and post-RoPE), their Fisher information and the
attention each token receives, gathered by hooks on an unpatched model over calibration windows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from kvbench.errors import UserError
from kvbench.model.anatomy import apply_rope, attention_modules


NEEDS = frozenset({"keys", "keys_post", "values", "fisher", "attention"})


def calibration_batches(tok, text: str, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``num_samples`` windows of ``seqlen`` tokens at seeded random offsets of ``text`` -> ``(N, T)``."""
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < seqlen + 1:
        raise UserError(f"the calibration text has {ids.numel()} tokens, fewer than calib.seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (num_samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(B, T, H*D)`` or ``(B, T, H, D)`` -> ``(B, H, T, D)``."""
    return x.reshape(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def collect(model, batches: torch.Tensor, needs: frozenset[str], progress: bool = True) -> dict:
    """Run the (unpatched) model on calibration batches and gather per-layer statistics.

    Returns a dict with, for each requested need, a list over layers of:
      ``keys`` pre-RoPE keys ``(N, H_kv, T, D)``; ``keys_post`` post-RoPE keys ``(N, H_kv, T, D)``;
      ``values`` ``(N, H_kv, T, D)``; with ``fisher``, ``fisher_keys`` / ``fisher_values``: squared
      gradients of the summed LM loss w.r.t. those (pre-RoPE) activations, same shapes (and
      ``fisher_keys_post`` w.r.t. post-RoPE keys when ``keys_post`` is requested too);
      ``attention``: average attention each token receives ``(N, H_q, T)`` (column sums of the
      attention probabilities divided by the number of queries that see the token).
    """
    unknown = set(needs) - NEEDS
    if unknown:
        raise ValueError(f"unknown calibration needs {sorted(unknown)}; known: {sorted(NEEDS)}")
    attn = attention_modules(model)
    device = next(model.parameters()).device
    fisher = "fisher" in needs
    stats: dict[str, list[list[torch.Tensor]]] = {k: [[] for _ in attn] for k in
                                                   ("keys", "keys_post", "values", "fisher_keys", "fisher_keys_post", "fisher_values", "attention")}
    live: dict = {}

    def grab(name, mod):
        def hook(module, args, out):
            if fisher:
                out = out.detach().requires_grad_(True)
            live[(name, mod.layer_idx)] = out
            return out
        return hook

    def grab_rope(module, args, kwargs):
        live[("rope", module.layer_idx)] = kwargs.get("position_embeddings")

    handles = []
    for mod in attn:
        handles.append((getattr(mod, "k_norm", None) or mod.k_proj).register_forward_hook(grab("k", mod)))
        handles.append(mod.v_proj.register_forward_hook(grab("v", mod)))
        handles.append(mod.register_forward_pre_hook(grab_rope, with_kwargs=True))
    prev_impl = model.config._attn_implementation
    # Fisher needs gradients w.r.t. activations only: freeze the weights so backward skips them
    frozen = [p for p in model.parameters() if p.requires_grad] if fisher else []
    for p in frozen:
        p.requires_grad_(False)
    if "attention" in needs:
        model.set_attn_implementation("eager")
    try:
        for x in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            x = x.unsqueeze(0).to(device)
            with torch.set_grad_enabled(fisher):
                out = model(x, labels=x if fisher else None, output_attentions="attention" in needs, use_cache=False)
                if fisher:
                    out.loss.backward()
            for i, mod in enumerate(attn):
                k, v = live[("k", mod.layer_idx)], live[("v", mod.layer_idx)]
                k_heads = _heads(k.detach(), mod.head_dim).float().cpu()
                if "keys" in needs:
                    stats["keys"][i].append(k_heads)
                if "values" in needs:
                    stats["values"][i].append(_heads(v.detach(), mod.head_dim).float().cpu())
                if "keys_post" in needs:
                    rope = live.get(("rope", mod.layer_idx))
                    post = apply_rope(k_heads, *(t.float().cpu() for t in rope)) if rope is not None else k_heads
                    stats["keys_post"][i].append(post)
                if fisher:
                    g_heads = _heads(k.grad, mod.head_dim).float().cpu()
                    stats["fisher_keys"][i].append(g_heads.pow(2))
                    if "keys_post" in needs:  # RoPE is a rotation R: dL/dk_post = R dL/dk_pre
                        rope = live.get(("rope", mod.layer_idx))
                        g_post = apply_rope(g_heads, *(t.float().cpu() for t in rope)) if rope is not None else g_heads
                        stats["fisher_keys_post"][i].append(g_post.pow(2))
                    stats["fisher_values"][i].append(_heads(v.grad, mod.head_dim).float().pow(2).cpu())
                if "attention" in needs:
                    p = out.attentions[i][0].float()  # (H_q, T, T)
                    T = p.shape[-1]
                    seen_by = torch.arange(T, 0, -1, device=p.device, dtype=p.dtype)  # queries i >= j
                    stats["attention"][i].append((p.sum(-2) / seen_by).cpu())  # (H_q, T)
            live.clear()
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(prev_impl)
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    return {k: [torch.cat(v) if k != "attention" else torch.stack(v) for v in layers]
            for k, layers in stats.items() if layers[0]}


_STATS_CACHE: dict = {}  # one entry: the statistics of the last calibration, for the next run of a sweep


def cached_collect(cfg, model, batches: torch.Tensor, needs: frozenset[str]) -> dict:
    """:func:`collect`, reusing the previous call's statistics when they cover ``needs``.

    Runs of a sweep execute in one process and often share the model and calibration batches while
    the method's settings change (e.g. an ablation): only the method's fit is then recomputed.
    Statistics gathered with ``fisher`` serve a request without it (the Fisher entries are dropped).
    """
    ident = (json.dumps(_plain(cfg.model), sort_keys=True, default=str),
             hashlib.sha1(batches.numpy().tobytes()).hexdigest(), str(next(model.parameters()).device))
    hit = _STATS_CACHE.get(ident)
    # "attention" switches the forward to eager attention, whose K/V differ from SDPA's by ~1e-5: a
    # statistic collected with it must not serve a run without it (its artifact would depend on run order)
    if hit is not None and needs <= hit[0] and ("attention" in needs) == ("attention" in hit[0]):
        stats = hit[1]
        if "fisher" not in needs:
            stats = {k: v for k, v in stats.items() if not k.startswith("fisher")}
        return stats
    _STATS_CACHE.clear()
    stats = collect(model, batches, needs, cfg.logging.progress)
    _STATS_CACHE[ident] = (frozenset(needs), stats)
    return stats


def without_sink(stats: dict, n: int) -> dict:
    """Statistics without the first ``n`` tokens of every calibration window, for every method.

    The sink tokens stay in fp16 at run time (the shared component), so no method fits ranges, scales
    or codebooks to them (their keys and values are the largest of the sequence). Per-token tensors
    ``(N, H, T, D)`` lose them; the attention each token receives ``(N, H_q, T)`` keeps every position,
    since offline token groups are maps by position.
    """
    if n <= 0:
        return stats
    return {k: v if k == "attention" else [x[..., n:, :] for x in v] for k, v in stats.items()}


def _plain(cfg) -> dict:
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)
