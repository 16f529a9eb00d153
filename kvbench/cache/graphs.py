"""Decode steps replayed as CUDA graphs: one-token forward passes without the host's per-step cost.

A decode step of a small batch launches a few hundred kernels of a few microseconds each; run eagerly, the
host's Python and launch overhead, not the GPU, sets the pace. :class:`GraphedDecoder` captures one step of
``model`` on its cache into a ``torch.cuda.CUDAGraph`` and replays it, the inputs copied into fixed buffers.
The same treatment for every cache it takes:

* a compileable cache (transformers' ``StaticCache``): every step writes at ``cache_position``, so one graph
  serves the whole generation;
* a :class:`~kvbench.cache.packed.PackedCache`: its kernels read the packed and recent counts from the GPU and
  split the store by its capacity, so a step that only appends to the recent windows
  (:meth:`~kvbench.cache.packed.PackedCache.decode_step_replayable`) is replayed; a step that packs a block
  (every ``key_block`` tokens) or fills a sink token runs eagerly. The graph stays valid while the cache's
  :meth:`~kvbench.cache.packed.PackedCache.graph_key` does (no buffer has grown and moved); else the next
  replayable step captures a new one.

A graph is captured at a step after an eager one (the eager step has compiled and warmed every kernel). The
capture runs the forward's Python once without running its GPU work; the packed cache's host counts advance
then, so the replay that follows leaves host and GPU in step.
"""

from __future__ import annotations

import torch

from .packed import PackedCache


def decode_step(model, cache, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One forward of ``ids (B, 1)`` at position ``pos`` (a ``(1,)`` long tensor) over ``cache``, eagerly: the
    logits ``(B, vocab)``."""
    out = model(input_ids=ids, past_key_values=cache, position_ids=pos.expand(ids.shape[0], 1), cache_position=pos,
                use_cache=True)
    return out.logits[:, -1]


class GraphedDecoder:
    """One-token decode steps of ``model`` over ``cache`` (batch ``B``), replayed as CUDA graphs where the cache
    allows it. Call it as ``logits = dec(ids (B, 1), position)``; ``logits (B, vocab)`` is a buffer the next
    call overwrites. ``stats`` counts ``eager``, ``captured`` and ``replayed`` steps."""

    def __init__(self, model, cache, batch: int):
        if not (isinstance(cache, PackedCache) or getattr(cache, "is_compileable", False)):
            raise ValueError(f"{type(cache).__name__} cannot be replayed as a CUDA graph: its shapes grow every "
                             "step (use StaticCache or the packed cache)")
        self.model, self.cache = model, cache
        self.packed = isinstance(cache, PackedCache)
        dev = next(model.parameters()).device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = self.logits = self.key = None
        self.warm = False  # an eager step has compiled and warmed every kernel of a step
        self.moved = False  # an eager step ran since the key was taken: only such a step can move a buffer
        self.stats = {"eager": 0, "captured": 0, "replayed": 0}

    def _forward(self) -> torch.Tensor:
        return decode_step(self.model, self.cache, self.ids, self.pos)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.fill_(position)
        if (self.packed and not self.cache.decode_step_replayable()) or not self.warm:
            self.warm = self.moved = True
            self.stats["eager"] += 1
            return self._forward()
        if self.moved:  # the key is taken after eager steps only: replays and captures move nothing
            self.moved = False
            key = self.cache.graph_key() if self.packed else None
            if key != self.key:
                self.graph, self.key = None, key  # frees the old graph's memory pool before the new capture
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # its own memory pool
                self.logits = self._forward()  # host counts advance here; the GPU's with the replay below
            self.stats["captured"] += 1
        elif self.packed:
            self.cache.replayed_decode_step()
        self.graph.replay()
        self.stats["replayed"] += 1
        return self.logits
