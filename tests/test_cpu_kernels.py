"""llmstack's C attention kernel against torch's scaled_dot_product_attention, and its fallbacks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from llmstack.workers.backends import cpu_kernels  # noqa: E402


@pytest.fixture(scope="module")
def attention() -> cpu_kernels.CacheAttention:
    kernel = cpu_kernels.cache_attention()
    if kernel is None:
        pytest.skip("no C compiler here: the kernel falls back to torch (tested below)")
    return kernel


def run_case(
    attention: cpu_kernels.CacheAttention,
    *,
    kv_heads: int,
    group: int,
    dim: int,
    starts: Sequence[int],
    counts: Sequence[int],
    slots: Sequence[int],
    max_len: int = 64,
) -> None:
    """New tokens of several sequences, packed as the backend packs them (q, k and v of a token side by
    side in one row, so every row is strided); compare with SDPA over the reference cache."""
    gen = torch.Generator().manual_seed(sum(counts) * 31 + dim)
    heads = kv_heads * group
    total = sum(counts)
    k_cache = torch.randn(max(slots) + 2, kv_heads, max_len, dim, generator=gen)
    v_cache = torch.randn(max(slots) + 2, kv_heads, max_len, dim, generator=gen)
    packed = torch.randn(total, heads + 2 * kv_heads, dim, generator=gen)
    q, k_new, v_new = packed[:, :heads], packed[:, heads : heads + kv_heads], packed[:, heads + kv_heads :]
    scale = dim**-0.5

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = torch.empty(total, heads, dim)
    t = 0
    for slot, start, count in zip(slots, starts, counts, strict=True):
        expected_k[slot, :, start : start + count] = k_new[t : t + count].transpose(0, 1)
        expected_v[slot, :, start : start + count] = v_new[t : t + count].transpose(0, 1)
        keys = expected_k[slot, :, : start + count].repeat_interleave(group, 0)
        values = expected_v[slot, :, : start + count].repeat_interleave(group, 0)
        # Token i of this sequence sees keys 0 .. start + i.
        visible = torch.arange(start + count).unsqueeze(0) <= (start + torch.arange(count)).unsqueeze(1)
        out = F.scaled_dot_product_attention(
            q[t : t + count].transpose(0, 1), keys, values, attn_mask=visible, scale=scale
        )
        expected[t : t + count] = out.transpose(0, 1)
        t += count

    out = torch.full((total, heads, dim), float("nan"))
    longs = [torch.tensor(x, dtype=torch.long) for x in (slots, starts, counts)]
    attention(q, k_new, v_new, out, k_cache, v_cache, *longs, scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_decode_steps_match_sdpa(attention: cpu_kernels.CacheAttention) -> None:
    # One token per sequence at cached lengths around the 8-key blocks; slots out of order.
    run_case(attention, kv_heads=2, group=2, dim=32, starts=[0, 6, 7, 8, 15, 40], counts=[1] * 6,
             slots=[3, 0, 5, 1, 2, 4])  # fmt: skip


def test_prefills_and_chunked_prefills_match_causal_sdpa(attention: cpu_kernels.CacheAttention) -> None:
    # Whole prompts (start 0) and a continuation chunk after 9 cached tokens, in one call.
    run_case(attention, kv_heads=2, group=4, dim=64, starts=[0, 0, 9], counts=[1, 17, 12], slots=[2, 0, 1])


@pytest.mark.parametrize(("kv_heads", "group", "dim"), [(4, 1, 16), (1, 3, 12), (3, 2, 40)])
def test_head_shapes_and_the_scalar_path(
    attention: cpu_kernels.CacheAttention, kv_heads: int, group: int, dim: int
) -> None:
    # No grouping, odd groups, and head dims that are not multiples of 8 or 32 (scalar code paths).
    run_case(attention, kv_heads=kv_heads, group=group, dim=dim, starts=[0, 3], counts=[5, 1], slots=[1, 0])


def test_bad_lengths_are_refused(attention: cpu_kernels.CacheAttention) -> None:
    cache = torch.zeros(1, 1, 8, 8)
    rows = torch.zeros(1, 1, 8)
    longs = [torch.tensor([0]), torch.tensor([0]), torch.tensor([0])]  # count 0
    with pytest.raises(ValueError, match="positive count"):
        attention(rows, rows, rows, torch.empty(1, 1, 8), cache, cache.clone(), *longs, 1.0)


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    assert cpu_kernels.cache_attention() is None


def test_a_failing_compiler_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    assert cpu_kernels.cache_attention() is None
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_the_fused_backend_attends_with_the_kernel_on_cpu(attention: cpu_kernels.CacheAttention) -> None:
    from llmstack.models.tiny import ensure_tiny_model
    from llmstack.workers.backends.loader import load
    from llmstack.workers.protocol import WorkerOptions

    options = WorkerOptions(model=str(ensure_tiny_model()), served_model_name="tiny", max_model_len=64,
                            torch_threads=1)  # fmt: skip
    loaded = load(options)
    assert loaded.backend.info().extra["attention"] == "llmstack-cpu"
    # Whole-batch decode and prefill go through it; greedy equivalence with transformers is checked for
    # both attention paths in test_lightweight_scheduler.py.
    logits = loaded.backend.prefill([7, 8], [[1, 5, 9], [1, 6]])
    assert logits.shape == (2, loaded.backend.vocab_size) and torch.isfinite(logits).all()
