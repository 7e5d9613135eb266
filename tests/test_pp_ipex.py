"""engine=pp engine.backend=ipex_llm on CPU: each rank's projections are ipex-llm's low-bit linears.

The pipeline runs under `.venv-ipex/bin/python` (ipex-llm 2.2, transformers 4.37; `scripts/setup.sh --ipex`
builds it), real torchrun and gloo, the tiny model over 2 ranks (one layer each) and over 1. Low-bit sym_int4:
every rank reports the formats of its linears (/info, its log), the split does not change a greedy token
(each layer is quantized the same wherever it runs), and the tokens are ipex-llm's own `generate`'s for the
same format; the unquantized backend under the same interpreter gives transformers' greedy tokens, and
other tokens than sym_int4 on some prompt. The workers run one after another. About 60 s.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmstack.models.tiny import ensure_tiny_model
from tests.lightweight_worker import API_KEY, start_worker
from tests.test_lightweight_ipex import IPEX_PYTHON, REFERENCE_SCRIPT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not IPEX_PYTHON.exists(),
        reason=".venv-ipex is absent: build it with scripts/setup.sh --ipex (CI does, so these run there)",
    ),
]

PROMPTS = ["hello world", "the quick brown fox", "one two three four five six", "a b c d e f g " * 5]
NEW_TOKENS = 16
IPEX = ("engine.backend=ipex_llm", "low_bit=sym_int4", f"engine.python={IPEX_PYTHON}")
RUNS: dict[str, tuple[str, ...]] = {
    "two_ranks": (*IPEX, "engine.pipeline_parallel_size=2"),
    "one_rank": (*IPEX, "engine.pipeline_parallel_size=1"),
    # The transformers backend in the same interpreter: unquantized stages under transformers 4.37.
    "unquantized": ("engine.backend=transformers", f"engine.python={IPEX_PYTHON}"),
}

# transformers' own greedy generate in the ipex interpreter (float32, unquantized).
PLAIN_REFERENCE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
path, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
out = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False)[0, len(p):].tolist()
       for p in prompts]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def prompt_ids() -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, prompt_ids: list[list[int]]) -> dict[str, dict[str, Any]]:
    """Each configuration's greedy tokens for PROMPTS, its /info and its server log; one worker at a time
    (start_worker checks that none of its processes and not its port is left)."""
    out: dict[str, dict[str, Any]] = {}
    for name, overrides in RUNS.items():
        with contextlib.contextmanager(start_worker)(tmp_path_factory, *overrides, engine="pp") as worker:
            tokens = []
            for ids in prompt_ids:
                body = {"model": "tiny", "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True}  # fmt: skip
                tokens.append(worker.post("/v1/completions", body).json()["choices"][0]["token_ids"])
            auth = {"Authorization": f"Bearer {API_KEY}"}
            facts = httpx.get(worker.base_url + "/info", headers=auth).json()
            out[name] = {"tokens": tokens, "info": facts, "log": Path(worker.proc.log_path)}
        # Read after stop: every rank's last lines are in.
        out[name]["log"] = out[name]["log"].read_text(errors="replace")
    return out


def reference(script: str, *args: str) -> list[list[int]]:
    command = [str(IPEX_PYTHON), "-c", script, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, done.stderr[-2000:]
    return json.loads(line[len("RESULT ") :])


def test_every_rank_converts_its_linears_to_the_low_bit_format(runs: dict[str, dict[str, Any]]) -> None:
    two, one = runs["two_ranks"]["info"], runs["one_rank"]["info"]
    assert (two["backend"], two["low_bit"], two["dtype"]) == ("ipex_llm", "sym_int4", "float32")
    # Per layer: QKV, O, gate/up, down; the last stage also the LM head. Nothing left unquantized.
    assert two["extra"]["stage_qtypes"] == [{"sym_int4": 4}, {"sym_int4": 5}]
    assert two["extra"]["qtypes"] == one["extra"]["qtypes"] == {"sym_int4": 9}
    assert one["extra"]["stage_qtypes"] == [{"sym_int4": 9}]
    log = runs["two_ranks"]["log"]
    assert "rank 0: ipex-llm sym_int4 linears: 4 sym_int4" in log
    assert "rank 1: ipex-llm sym_int4 linears: 5 sym_int4" in log
    # float32 activations on the CPU: llmstack's attention kernel, as under the transformers backend.
    assert two["extra"]["attention"] == "llmstack-cpu"
    plain = runs["unquantized"]["info"]
    assert plain["backend"] == "transformers" and "qtypes" not in plain["extra"]


def test_a_split_does_not_change_the_tokens(runs: dict[str, dict[str, Any]]) -> None:
    assert runs["two_ranks"]["tokens"] == runs["one_rank"]["tokens"]
    assert all(len(t) == NEW_TOKENS for t in runs["two_ranks"]["tokens"])


def test_tokens_are_ipex_llms_own_generate(
    runs: dict[str, dict[str, Any]], prompt_ids: list[list[int]]
) -> None:
    path = str(ensure_tiny_model())
    want = reference(REFERENCE_SCRIPT, path, "sym_int4", json.dumps(prompt_ids), str(NEW_TOKENS))
    assert runs["two_ranks"]["tokens"] == want


def test_unquantized_stages_under_transformers_4_37(
    runs: dict[str, dict[str, Any]], prompt_ids: list[list[int]]
) -> None:
    plain = runs["unquantized"]["tokens"]
    want = reference(PLAIN_REFERENCE, str(ensure_tiny_model()), json.dumps(prompt_ids), str(NEW_TOKENS))
    assert plain == want
    # sym_int4's rounding changes some greedy token of the tiny random model: the low-bit path ran.
    assert plain != runs["two_ranks"]["tokens"]
