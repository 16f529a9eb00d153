"""Long-context pieces of the GPU pipeline (issue 17), checked on a CPU: QoKV's blockwise received
attention against the dense formula it replaces."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.methods.components.grouping import received_attention


def dense_received_attention(query, keys, query_start, lo, hi):
    """The dense formula (one ``(B, H_q, T_q, T)`` tensor), the pre-issue-17 implementation."""
    B, H, Tq, D = query.shape
    T = keys.shape[-2]
    k = keys.double().repeat_interleave(H // keys.shape[1], dim=1)  # (B, H_q, T, D)
    logits = query.double() @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H_q, T_q, T)
    visible = torch.arange(T)[None, :] <= torch.arange(query_start, query_start + Tq)[:, None]
    p = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)
    return p[..., lo:hi].sum(-2).mean(1) / visible[:, lo:hi].sum(0).clamp_min(1)


@pytest.mark.parametrize("block_bytes", [1, 4 * 2 * 8 * 40 * 3, 1 << 30])  # 1 query, 3 queries, one block
@pytest.mark.parametrize("query_start,lo,hi", [(0, 0, 40), (0, 5, 17), (24, 0, 40), (24, 24, 40), (39, 30, 40)])
def test_blockwise_received_attention_matches_dense(block_bytes, query_start, lo, hi):
    g = torch.Generator().manual_seed(query_start * 100 + lo + hi)
    B, H, H_kv, D, T = 2, 8, 2, 16, 40
    keys = torch.randn(B, H_kv, T, D, generator=g) * 2
    query = torch.randn(B, H, T - query_start, D, generator=g) * 2
    got = received_attention(query, keys, query_start, lo, hi, block_bytes=block_bytes)
    want = dense_received_attention(query, keys, query_start, lo, hi)
    assert got.shape == (B, hi - lo)
    err = (got.double() - want).abs().max().item()
    assert err < 1e-6, f"max abs diff {err:.2e}"


@pytest.mark.parametrize("method", ["fp16", "uniform", "kvquant", "qokv"])
def test_batched_windows_give_the_same_perplexity(compose, tiny_model, wiki_splits, method, tmp_path):
    """``eval.batch_size`` windows per forward (what a GPU wants): the same per-block NLLs as one at a time."""
    from kvbench.run import evaluate, validate

    model, tok, _ = tiny_model
    got = {}
    for bs in (1, 3):
        cfg = compose(["model=tiny-llama", f"method={method}", "kv.bits=4", "eval.seqlen=128", "eval.max_windows=4",
                       f"eval.batch_size={bs}", "calib.num_samples=2", "calib.seqlen=128", "logging.progress=false",
                       f"calib.cache_dir={tmp_path}"])
        checked = validate(cfg)
        if checked.method.calibration_needs():
            from kvbench.calibration import prepare

            prepare(cfg, model, tok, checked.splits, checked.method)
        got[bs] = evaluate(cfg, model, tok, checked.splits, checked.method)
    a, b = got[1]["ppl_blocks"]["nll"], got[3]["ppl_blocks"]["nll"]
    assert len(a) == len(b) and got[1]["ppl_blocks"]["tokens"] == got[3]["ppl_blocks"]["tokens"]
    dev = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert dev < 1e-4, f"ppl {got[1]['ppl']} vs {got[3]['ppl']}: max rel. block deviation {dev:.1e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the TF32 path)")
def test_bf16_on_cuda_tf32_path_matches_fp64():
    """bf16 queries/keys on a GPU take TF32 matmuls (exact for bf16 values): fp32 accuracy all the same."""
    g = torch.Generator().manual_seed(0)
    before = torch.backends.cuda.matmul.allow_tf32
    B, H, H_kv, D, T = 2, 32, 8, 128, 1500
    keys = (torch.randn(B, H_kv, T, D, generator=g) * 2).bfloat16()
    query = (torch.randn(B, H, T, D, generator=g) * 2).bfloat16()
    got = received_attention(query.cuda(), keys.cuda(), 0, 0, T, block_bytes=1 << 26).cpu()
    want = dense_received_attention(query.float(), keys.float(), 0, 0, T)
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5, f"max rel. diff {err:.2e}"
    assert torch.backends.cuda.matmul.allow_tf32 == before  # restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (KVQuant's fit on the model's device)")
def test_kvquant_fit_on_cuda_matches_the_host_fit():
    """KVQuant's calibration fit (channel thresholds, Fisher-weighted k-means) gives the same state on the GPU."""
    from kvbench.quant import kmeans_1d, outlier_thresholds

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, 4096, generator=g) * torch.rand(8, 128, 1, generator=g) * 3
    w = torch.rand(x.shape, generator=g)
    for a, b in zip(outlier_thresholds(x, 0.01), outlier_thresholds(x.cuda(), 0.01)):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)
    want = kmeans_1d(x.flatten()[:1_000_000], 16, w.flatten()[:1_000_000])
    got = kmeans_1d(x.flatten()[:1_000_000].cuda(), 16, w.flatten()[:1_000_000].cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
