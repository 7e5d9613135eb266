"""The locally generated tiny model: determinism, shape, loadability and the cache protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llmstack.models import tiny

REPO_ROOT = Path(tiny.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.generate(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_regeneration_is_byte_identical(model_dir: Path, tmp_path: Path) -> None:
    again = tiny.generate(tmp_path / "again")
    first, second = _file_bytes(model_dir), _file_bytes(again)
    assert sorted(first) == sorted(tiny.MODEL_FILES)
    assert first == second


def test_config_sizes_suit_ipex_llm_and_match_tokenizer(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    config = _read_json(model_dir / "config.json")
    # ipex-llm only quantizes linears whose in_features is a multiple of 64.
    for key in ("hidden_size", "intermediate_size", "vocab_size"):
        assert config[key] % 64 == 0, key
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert config["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True) == tiny.TARGET_VOCAB_SIZE
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)


def test_weights_have_llama_names_and_shapes(model_dir: Path) -> None:
    from safetensors.numpy import load_file

    config = _read_json(model_dir / "config.json")
    weights = load_file(str(model_dir / "model.safetensors"))
    assert {name: array.shape for name, array in weights.items()} == tiny.weight_shapes(config["vocab_size"])
    assert all(array.dtype.name == "float32" for array in weights.values())
    assert (weights["model.norm.weight"] == 1.0).all()
    assert 0.015 < weights["lm_head.weight"].std() < 0.025
    # Untied: the output projection is drawn separately from the embeddings.
    assert not (weights["lm_head.weight"] == weights["model.embed_tokens.weight"]).all()


def test_every_token_id_decodes(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab_size = _read_json(model_dir / "config.json")["vocab_size"]
    for token_id, special in enumerate(tiny.SPECIAL_TOKENS):
        assert tokenizer.token_to_id(special) == token_id
    for token_id in range(vocab_size):
        assert tokenizer.decode([token_id], skip_special_tokens=False), token_id


def test_tokenizer_json_keeps_merges_readable_by_old_tokenizers(model_dir: Path) -> None:
    # tokenizers 0.15 (transformers 4.37, ipex-llm) only parses merges written as "left right".
    merges = _read_json(model_dir / "tokenizer.json")["model"]["merges"]
    assert merges and all(isinstance(merge, str) and merge.count(" ") == 1 for merge in merges)


def test_tokenizer_loads_as_fast_tokenizer_with_specials(hf_tokenizer) -> None:
    assert hf_tokenizer.is_fast
    assert len(hf_tokenizer) == tiny.TARGET_VOCAB_SIZE
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<s>", "</s>")
    assert (hf_tokenizer.unk_token_id, hf_tokenizer.pad_token_id) == (0, 3)
    ids = hf_tokenizer("Hello world, the model server!")["input_ids"]
    assert ids[0] == tiny.BOS_ID and ids.count(tiny.BOS_ID) == 1
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == "Hello world, the model server!"


def test_transformers_greedy_generation_is_deterministic(model_dir: Path, hf_tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = hf_tokenizer("the quick brown fox", return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]

    def greedy():
        # min_new_tokens: a random model may well pick </s> early.
        return model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)

    first, second = greedy(), greedy()
    assert tuple(first.shape) == (1, prompt_length + 8)
    assert first.tolist() == second.tolist()
    assert hf_tokenizer.decode(first[0, prompt_length:])  # the new ids decode to text


def test_chat_template_renders_generation_prompt(model_dir: Path, hf_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>\nBe brief.</s>\n<|user|>\nhi there</s>\n<|assistant|>\n"
    without = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("<|assistant|>\n")
    assert (model_dir / "chat_template.jinja").read_text(encoding="utf-8").strip() == tiny.CHAT_TEMPLATE


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLMSTACK_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny.default_cache_dir() == tmp_path / "home" / ".cache" / "llmstack"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tiny.default_cache_dir() == tmp_path / "xdg" / "llmstack"
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path / "explicit"))
    assert tiny.default_cache_dir() == tmp_path / "explicit"
    assert tiny.tiny_model_dir() == tmp_path / "explicit" / "models" / tiny.MODEL_NAME


def test_ensure_tiny_model_generates_once_then_reuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path))
    path = tiny.ensure_tiny_model()
    assert path == tmp_path / "models" / tiny.MODEL_NAME
    assert tiny.is_complete(path)
    mtimes = {child.name: child.stat().st_mtime_ns for child in path.iterdir()}

    assert tiny.ensure_tiny_model() == path
    assert {child.name: child.stat().st_mtime_ns for child in path.iterdir()} == mtimes
    # Only the model and its lock file: no staging directory left behind.
    siblings = sorted(child.name for child in path.parent.iterdir())
    assert siblings == [tiny.MODEL_NAME, f"{tiny.MODEL_NAME}.lock"]


def test_ensure_tiny_model_replaces_an_incomplete_directory(tmp_path: Path) -> None:
    leftover = tiny.tiny_model_dir(tmp_path)
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}", encoding="utf-8")

    path = tiny.ensure_tiny_model(tmp_path)
    assert tiny.is_complete(path)
    assert _read_json(path / "config.json")["model_type"] == "llama"


def test_concurrent_ensure_calls_agree(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(tiny.ensure_tiny_model(tmp_path))
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [tiny.tiny_model_dir(tmp_path)] * 4
    assert tiny.is_complete(results[0])
    # No staging directory is left behind.
    assert len(list(results[0].parent.iterdir())) == 2


def _run_module(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "llmstack.models.tiny", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_cli_writes_the_model(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-model"
    result = _run_module(str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert _file_bytes(out) == _file_bytes(model_dir)


def test_importing_the_module_stays_light() -> None:
    # The launcher imports this module on every start; the heavy libraries load only when generating.
    code = (
        "import sys, llmstack.models.tiny\n"
        "print(sorted(m for m in ('numpy', 'tokenizers', 'safetensors', 'torch', 'transformers')"
        " if m in sys.modules))"
    )
    result = _run_module(code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
