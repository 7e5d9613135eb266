"""Memory fit: parameter counts, weights per low_bit and KV cache against hand-computed figures.

The shapes are the models' published config.json values (configs/model/*.yaml). Every expected figure below
is worked out by hand in the comment beside it; the code computes it independently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config.architecture import read_config_json, with_config_json
from llmstack.config.resolve import load_low_bit, resolve, to_run_config
from llmstack.config.schema import ModelConfig, RunConfig
from llmstack.devices import Inventory
from llmstack.engines.vllm.memory import GIB, Shape, estimate, parameter_count
from llmstack.errors import ConfigError
from llmstack.validation import validate

CONFIG = Path(CONFIG_DIR)

# (model, linear, embedding + lm_head, norms) with linear = layers x (attention + 3 x hidden x intermediate):
HAND_COUNTS = {
    # 32 x (4 x 4096 x 4096 + 3 x 4096 x 11008) = 32 x 202,375,168; 2 x 32000 x 4096; 32 x 2 x 4096 + 4096
    "llama2_7b": (6_476_005_376, 262_144_000, 266_240),
    # 32 x (2 x 4096 x 4096 + 2 x 4096 x 1024 + 3 x 4096 x 14336) = 32 x 218,103,808; 2 x 128256 x 4096
    "llama3_8b": (6_979_321_856, 1_050_673_152, 266_240),
    # 40 x (4 x 5120 x 5120 + 3 x 5120 x 13696) = 40 x 315,228,160; 2 x 152064 x 5120; 40 x 2 x 5120 + 5120
    "qwen14b": (12_609_126_400, 1_557_135_360, 414_720),
}

# Weights in bytes on one card: linear x bits / 8 + (embedding + norms) x 2 bytes.
HAND_WEIGHTS = {
    # sym_int4 = 4.5 bits (4 + one fp16 scale per 32): 6,476,005,376 x 9/16 + 262,410,240 x 2
    ("llama2_7b", "sym_int4"): 3_642_753_024 + 524_820_480,
    ("llama2_7b", "fp8"): 6_476_005_376 + 524_820_480,
    ("llama2_7b", "fp16"): 12_952_010_752 + 524_820_480,
    # 6,979,321,856 x 9/16 + 1,050,939,392 x 2
    ("llama3_8b", "sym_int4"): 3_925_868_544 + 2_101_878_784,
    ("llama3_8b", "fp8"): 6_979_321_856 + 2_101_878_784,
    ("llama3_8b", "fp16"): 13_958_643_712 + 2_101_878_784,
    # 12,609,126,400 x 9/16 + 1,557,550,080 x 2
    ("qwen14b", "sym_int4"): 7_092_633_600 + 3_115_100_160,
    ("qwen14b", "fp8"): 12_609_126_400 + 3_115_100_160,
    ("qwen14b", "fp16"): 25_218_252_800 + 3_115_100_160,
}

# KV cache bytes per token at fp16: 2 (K, V) x layers x KV heads x head_dim x 2 bytes.
HAND_KV_PER_TOKEN = {
    "llama2_7b": 2 * 32 * 32 * 128 * 2,  # 524,288
    "llama3_8b": 2 * 32 * 8 * 128 * 2,  # 131,072 (GQA: 8 KV heads)
    "qwen14b": 2 * 40 * 40 * 128 * 2,  # 819,200
}


def planned(compose_cfg, *overrides: str) -> RunConfig:
    return resolve(to_run_config(compose_cfg(*overrides)), CONFIG, Inventory())


def check(run: RunConfig) -> None:
    validate(run, CONFIG, host_checks=False)


@pytest.mark.parametrize("model", sorted(HAND_COUNTS))
def test_parameter_counts(compose_cfg, model: str) -> None:
    run = planned(compose_cfg, f"model={model}")
    shape = Shape.of(run.model.arch)
    assert shape is not None
    count = parameter_count(shape)
    assert (count.linear, count.embedding, count.norm) == HAND_COUNTS[model]


def test_counts_match_the_published_totals(compose_cfg) -> None:
    # Meta's model cards: Llama-2-7B 6,738,415,616 and Llama-3-8B 8,030,261,248 parameters.
    for model, published in (("llama2_7b", 6_738_415_616), ("llama3_8b", 8_030_261_248)):
        shape = Shape.of(planned(compose_cfg, f"model={model}").model.arch)
        assert shape is not None
        assert parameter_count(shape).total == published


@pytest.mark.parametrize(("model", "low_bit"), sorted(HAND_WEIGHTS))
def test_weights_per_low_bit(compose_cfg, model: str, low_bit: str) -> None:
    # max_1550: one 64 GiB stack, tp=1, dtype auto (16-bit unquantized weights).
    run = planned(compose_cfg, "profile=max_1550", f"model={model}")
    est = estimate(run, low_bit=load_low_bit(CONFIG, low_bit))
    assert est is not None
    assert est.weights_bytes == HAND_WEIGHTS[(model, low_bit)]
    assert est.kv_bytes_per_token == HAND_KV_PER_TOKEN[model]


def test_fp8_kv_cache_halves_it(compose_cfg) -> None:
    run = planned(compose_cfg, "profile=max_1550", "model=llama3_8b", "engine.kv_cache_dtype=fp8")
    est = estimate(run)
    assert est is not None and est.kv_bytes_per_token == 131_072 // 2


def test_tensor_parallel_splits_weights_and_kv(compose_cfg) -> None:
    run = planned(compose_cfg, "profile=arc_a770x2", "model=qwen14b")  # fp8 (the seed's), tp=2, block 8
    est = estimate(run)
    assert est is not None
    # 12,609,126,400 / 2 x 1 byte + (1,557,135,360 / 2 + 414,720 replicated norms) x 2 bytes
    assert est.weights_bytes == 6_304_563_200 + 1_557_964_800
    # 2 x 40 layers x 20 KV heads per card x 128 x 2 bytes; 2000 tokens = 250 blocks of 8
    assert est.kv_bytes_per_token == 409_600
    assert est.kv_one_sequence_bytes == 2000 * 409_600
    # 15.11 GiB x 0.9 = 14,601,815,064 bytes usable; (14,601,815,064 - 7,862,528,000) // 819,200,000 = 8
    assert est.budget_bytes == pytest.approx(14_601_815_064, abs=1)
    assert est.fits and est.full_length_sequences == 8
    check(run)


def test_qwen14b_fp8_does_not_fit_one_a770(compose_cfg) -> None:
    # 15,724,226,560 bytes of weights > 14,601,815,064 usable: the seed's table puts 14B on 2 cards.
    run = planned(compose_cfg, "profile=arc_a770", "model=qwen14b")
    with pytest.raises(ConfigError) as info:
        check(run)
    error = info.value
    assert error.key == "low_bit" and error.value == "fp8"
    assert "14.64 GiB of weights" in str(error) and "13.60 GiB usable" in str(error)
    assert "15.11 GiB x gpu_memory_utilization 0.9" in str(error)
    # sym_int4: 10,207,733,760 + 2000 x 819,200 = 11,846,133,760 bytes: fits. fp16: does not.
    assert error.choices is not None and "sym_int4" in error.choices and "fp16" not in error.choices
    assert "engine.tensor_parallel_size=2" in str(error)


def test_the_same_model_fits_at_sym_int4(compose_cfg) -> None:
    run = planned(compose_cfg, "profile=arc_a770", "model=qwen14b", "low_bit=sym_int4")
    est = estimate(run)
    assert est is not None and est.weights_bytes + est.kv_one_sequence_bytes == 11_846_133_760
    check(run)


def test_too_long_a_context_names_the_longest_that_fits(compose_cfg) -> None:
    run = planned(
        compose_cfg,
        "profile=arc_a770",
        "model=qwen14b",
        "low_bit=sym_int4",
        "engine.max_model_len=30000",
        "engine.max_num_batched_tokens=30000",
    )
    with pytest.raises(ConfigError) as info:
        check(run)
    # (14,601,815,064 - 10,207,733,760) // 819,200 = 5363 tokens, in whole blocks of 8: 5360.
    assert info.value.key == "engine.max_model_len"
    assert "at most 5360" in str(info.value)
    # Qwen1.5-14B has no GQA, and ipex-llm's fp8 KV cache needs it: not offered.
    assert "kv_cache_dtype" not in str(info.value)


def test_fp16_llama3_on_b580_offers_fp8(compose_cfg) -> None:
    run = planned(compose_cfg, "profile=arc_b580", "model=llama3_8b", "low_bit=fp16")
    with pytest.raises(ConfigError) as info:
        check(run)
    # 16,060,522,496 bytes > 11.33 GiB x 0.85; fp8_e4m3: 9,081,200,640 + 8192 x 131,072 fits.
    assert info.value.choices == ["fp8_e4m3"]


def test_no_check_without_device_memory(compose_cfg) -> None:
    run = planned(compose_cfg, "device=xpu", "device.count=1", "model=qwen14b", "low_bit=fp16")
    assert run.device.memory_gib is None and estimate(run) is None
    check(run)


def test_arc_allocation_limit_warns(compose_cfg, caplog: pytest.LogCaptureFixture) -> None:
    run = planned(
        compose_cfg,
        "profile=arc_a770x2",
        "model=qwen14b",
        "engine.max_model_len=8192",
        "engine.max_num_batched_tokens=8192",
    )
    with caplog.at_level(logging.WARNING, logger="llmstack.engines.vllm.memory"):
        check(run)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Prefill attention scores: 20 heads per card x 8192 x 8192 x 4 bytes = 5.00 GiB > 4.
    assert len(warnings) == 1
    assert "attention scores" in warnings[0] and "5.00 GiB" in warnings[0]
    assert "device.max_alloc_gib=4" in warnings[0]


def test_no_allocation_warning_with_the_seed_limits(compose_cfg, caplog: pytest.LogCaptureFixture) -> None:
    run = planned(compose_cfg, "profile=arc_a770x2", "model=qwen14b")
    with caplog.at_level(logging.WARNING, logger="llmstack.engines.vllm.memory"):
        check(run)
    # 20 x 3000 x 2000 x 4 bytes = 0.45 GiB: under the limit.
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_ipex_fp8_kv_cache_needs_gqa(compose_cfg) -> None:
    run = planned(compose_cfg, "profile=arc_a770x2", "model=qwen14b", "engine.kv_cache_dtype=fp8")
    with pytest.raises(ConfigError) as info:
        check(run)
    assert info.value.key == "engine.kv_cache_dtype" and "grouped-query" in str(info.value)
    check(planned(compose_cfg, "profile=arc_a770", "model=llama3_8b", "engine.kv_cache_dtype=fp8"))


def test_local_model_reads_config_json(compose_cfg, tmp_path: Path) -> None:
    config = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    run = planned(compose_cfg, "profile=arc_pro_b60", "model=local", f"model.path={tmp_path}")
    assert run.model.arch.hidden_size == 4096 and run.model.arch.num_key_value_heads == 8
    est = estimate(run)
    assert est is not None and est.weights_bytes == 9_081_200_640  # = Llama-3-8B at fp8, above


def test_config_values_win_over_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "vocab_size": 99}))
    model = ModelConfig(name="m", path=str(tmp_path))
    model = dataclasses.replace(model, arch=dataclasses.replace(model.arch, hidden_size=128))
    filled = with_config_json(model)
    assert (filled.arch.hidden_size, filled.arch.vocab_size) == (128, 99)


def test_multimodal_config_reads_text_config(tmp_path: Path) -> None:
    text = {"hidden_size": 3584, "num_hidden_layers": 28, "vocab_size": 152064}
    (tmp_path / "config.json").write_text(json.dumps({"text_config": text, "tie_word_embeddings": False}))
    assert read_config_json(tmp_path) == {**text, "tie_word_embeddings": False}


def test_tiny_model_facts_come_from_its_config_json(compose_cfg) -> None:
    from llmstack.models.tiny import ensure_tiny_model

    ensure_tiny_model()
    arch = planned(compose_cfg, "model=tiny").model.arch
    assert (arch.hidden_size, arch.num_hidden_layers, arch.num_key_value_heads) == (128, 2, 2)
    assert arch.vocab_size is not None and arch.vocab_size <= 1024


def test_dry_run_prints_the_estimate(compose_cfg) -> None:
    from llmstack.engines import get_engine
    from llmstack.run import render_dry_run

    run = planned(compose_cfg, "profile=arc_a770x2", "model=qwen14b")
    text = render_dry_run(run, get_engine("vllm").plan(run))
    assert "# Memory estimate over 2 x 1 cards" in text and f"{7_862_528_000 / GIB:.2f} GiB" in text
