"""The fast backend (`llmstack.workers.backends.fast_llama`) computes what transformers computes.

On CPU in float32: greedy tokens and every step's logits equal `model.generate`'s for the same prompt, for
a sequence alone and for sequences that join, leave (slot compaction) and share decode steps at different
positions; with exact shapes and with the bucket-padded shapes that CUDA graphs replay. The models are the
tiny Llama and a small random Qwen2 (attention biases, tied embeddings, grouped-query heads, rope_theta 1e6).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmstack.workers.backends.base import BackendInfo  # noqa: E402
from llmstack.workers.backends.fast_llama import FastLlamaBackend, batch_buckets, width_buckets  # noqa: E402
from llmstack.workers.backends.layers import unsupported_reason  # noqa: E402

# Loads models (about 8 s in all).
pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 72
NEW_TOKENS = 12


def _qwen2() -> torch.nn.Module:
    config = transformers.Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(7)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Random init leaves biases at zero: give them values, so a bias that went missing would show.
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
            layer.input_layernorm.weight.normal_(1.0, 0.2)
    return model.float().eval()


def _tiny_llama() -> torch.nn.Module:
    from llmstack.models.tiny import ensure_tiny_model

    return transformers.AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["tiny-llama", "qwen2"])
def reference(request: pytest.FixtureRequest) -> Iterator[torch.nn.Module]:
    yield _tiny_llama() if request.param == "tiny-llama" else _qwen2()


def _backend(model: torch.nn.Module, *, static_shapes: bool, max_batch_size: int = 4) -> FastLlamaBackend:
    info = BackendInfo("transformers", "fast", "cpu", "float32", None, model.config.model_type)
    return FastLlamaBackend(
        copy.deepcopy(model),
        max_batch_size=max_batch_size,
        max_model_len=MAX_MODEL_LEN,
        info=info,
        static_shapes=static_shapes,
        min_width=16,
    )


def _prompt(model: torch.nn.Module, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (length,), generator=generator).tolist()


def _hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, torch.cat(out.logits, dim=0)


def test_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]
    assert width_buckets(384) == [128, 256, 384]
    assert width_buckets(1024) == [128, 256, 512, 1024]
    assert width_buckets(64) == [64]


def test_unsupported_models_are_named() -> None:
    model = _qwen2()
    assert unsupported_reason(model, 128) is None
    model.config.model_type = "gpt2"
    assert "gpt2" in str(unsupported_reason(model, 128))


@pytest.mark.parametrize("static_shapes", [False, True], ids=["exact", "buckets"])
def test_alone_matches_generate(reference: torch.nn.Module, static_shapes: bool) -> None:
    backend = _backend(reference, static_shapes=static_shapes)
    prompt = _prompt(reference, 9, seed=1)
    expected, expected_logits = _hf_greedy(reference, prompt, NEW_TOKENS)
    with torch.inference_mode():
        logits = [backend.prefill([5], [prompt])[0]]
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < NEW_TOKENS:
            logits.append(backend.decode([5], [tokens[-1]])[0])
            tokens.append(int(logits[-1].argmax()))
    assert tokens == expected
    torch.testing.assert_close(torch.stack(logits), expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("static_shapes", [False, True], ids=["exact", "buckets"])
def test_batched_sequences_at_different_positions_match_generate(
    reference: torch.nn.Module, static_shapes: bool
) -> None:
    """Sequences join mid-flight, decode together at different positions, leave early; order is shuffled."""
    backend = _backend(reference, static_shapes=static_shapes)
    prompts = {10: _prompt(reference, 7, 2), 11: _prompt(reference, 13, 3), 12: _prompt(reference, 3, 4)}
    prompts[13] = _prompt(reference, 21, 5)
    budget = {10: 5, 11: NEW_TOKENS, 12: NEW_TOKENS, 13: NEW_TOKENS}  # 10 leaves early: compaction
    expected = {s: _hf_greedy(reference, p, budget[s]) for s, p in prompts.items()}
    got: dict[int, list[int]] = {}
    got_logits: dict[int, list[torch.Tensor]] = {}

    def admit(seq_ids: list[int]) -> None:
        logits = backend.prefill(seq_ids, [prompts[s] for s in seq_ids])
        for row, s in enumerate(seq_ids):
            got[s] = [int(logits[row].argmax())]
            got_logits[s] = [logits[row]]

    def step(seq_ids: list[int]) -> None:
        logits = backend.decode(seq_ids, [got[s][-1] for s in seq_ids])
        for row, s in enumerate(seq_ids):
            got[s].append(int(logits[row].argmax()))
            got_logits[s].append(logits[row])
        for s in seq_ids:
            if len(got[s]) == budget[s]:
                backend.release(s)

    with torch.inference_mode():
        admit([10])
        step([10])
        step([10])
        admit([11, 12])  # one prefill batch, two lengths (right padding)
        step([12, 10, 11])
        step([11, 12, 10])  # 10 reaches its budget and is released: the last slot moves into its slot
        admit([13])
        step([11])  # a subset: the others must not be disturbed
        while any(len(got[s]) < budget[s] for s in (11, 12, 13)):
            step([s for s in (13, 12, 11) if len(got[s]) < budget[s]])
    for s in prompts:
        assert got[s] == expected[s][0], f"sequence {s}"
        torch.testing.assert_close(torch.stack(got_logits[s]), expected[s][1], rtol=1e-4, atol=1e-4)
    assert backend._slot_of == {}  # every sequence was released
