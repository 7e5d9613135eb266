"""The lightweight worker's ipex_llm backend on CPU: real ipex-llm low-bit layers, in its own interpreter.

The worker runs under `.venv-ipex/bin/python` (ipex-llm needs transformers 4.37; `scripts/setup.sh --ipex`
builds it, and CI does). For sym_int4 and sym_int8: the loaded model's linear layers are ipex-llm's
LowBitLinear holding that format, generation and streaming work, and greedy output equals ipex-llm's own
`generate` token for token, alone and in a shared batch. About 60 s.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmstack.models.tiny import NUM_HIDDEN_LAYERS, ensure_tiny_model
from tests.lightweight_worker import API_KEY, Worker, start_worker

REPO = Path(__file__).resolve().parent.parent
IPEX_PYTHON = REPO / ".venv-ipex" / "bin" / "python"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not IPEX_PYTHON.exists(),
        reason=".venv-ipex is absent: build it with scripts/setup.sh --ipex (CI does, so these run there)",
    ),
]

# ipex-llm's own greedy generate, in its interpreter, for the same format and dtype as the worker.
REFERENCE_SCRIPT = """
import json, sys, torch
from ipex_llm.transformers import AutoModelForCausalLM
path, low_bit, prompts, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit=low_bit, torch_dtype=torch.float32,
                                             optimize_model=True, use_cache=True).eval()
out = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False)[0, len(p):].tolist()
       for p in prompts]
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module", params=["sym_int4", "sym_int8"])
def ipex_worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    yield from start_worker(
        tmp_path_factory,
        "engine.backend=ipex_llm",
        f"low_bit={request.param}",
        f"engine.python={IPEX_PYTHON}",
    )


def info(worker: Worker) -> dict:
    return httpx.get(worker.base_url + "/info", headers={"Authorization": f"Bearer {API_KEY}"}).json()


def test_linear_layers_are_ipex_low_bit(ipex_worker: Worker) -> None:
    facts = info(ipex_worker)
    fmt = facts["low_bit"]
    assert (
        facts["backend"] == "ipex_llm"
        and facts["model_impl"] == "generic"
        and fmt in ("sym_int4", "sym_int8")
    )
    modules = facts["module_types"]
    # Per layer: q/k/v (merged by ipex-llm into qkv_proj), o, gate, up, down; plus lm_head.
    assert modules.get("LowBitLinear", 0) >= 5 * NUM_HIDDEN_LAYERS
    assert "Linear" not in modules, f"unconverted nn.Linear layers remain: {modules}"
    assert facts["extra"]["qtypes"] == {fmt: modules["LowBitLinear"]}


def test_generation_and_streaming(ipex_worker: Worker) -> None:
    client = ipex_worker.client()
    done = client.completions.create(model="tiny", prompt="hello world", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    assert done.usage.completion_tokens == 16 and done.choices[0].text
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10, stream=True, temperature=0,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3
    assert chunks[-1].usage.completion_tokens == 10
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"


def test_greedy_equals_ipex_generate_alone_and_batched(ipex_worker: Worker) -> None:
    from transformers import AutoTokenizer

    fmt = info(ipex_worker)["low_bit"]
    path = str(ensure_tiny_model())
    prompts = ["the model token server engine", "hello " * 20]
    ids = [AutoTokenizer.from_pretrained(path)(p)["input_ids"] for p in prompts]
    done = subprocess.run(
        [str(IPEX_PYTHON), "-c", REFERENCE_SCRIPT, path, fmt, json.dumps(ids), "30"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, done.stderr[-2000:]
    want = json.loads(line[len("RESULT ") :])

    def ask(prompt: str, results: list, index: int) -> None:
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 30,
            "temperature": 0,
            "return_token_ids": True,
        }
        results[index] = ipex_worker.post("/v1/completions", body).json()["choices"][0]["token_ids"]

    alone = [None, None]
    for i, prompt in enumerate(prompts):
        ask(prompt, alone, i)
    assert alone == want
    together = [None, None]
    threads = [threading.Thread(target=ask, args=(p, together, i)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == want
