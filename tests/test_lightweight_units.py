"""engine=lightweight without a model: plans, validation, worker flags, sampler, detokenizer, stops, metrics.

Fast (no model is loaded, no server started). The worker's behaviour against the real tiny model is in
test_lightweight_scheduler.py (in process) and test_lightweight_integration.py (over HTTP).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from llmstack.cli import CONFIG_DIR
from llmstack.config.resolve import resolve, to_run_config
from llmstack.devices import Inventory
from llmstack.engines import get_engine
from llmstack.engines.base import SOURCE_ROOT
from llmstack.errors import ConfigError
from llmstack.validation import validate
from llmstack.workers.protocol import API_KEY_ENV, LIGHTWEIGHT_MODULE, WorkerOptions

CPU_ONLY = Inventory()


def resolved(compose_cfg, *overrides: str):
    return resolve(to_run_config(compose_cfg("engine=lightweight", *overrides)), Path(CONFIG_DIR), CPU_ONLY)


def check(compose_cfg, *overrides: str) -> None:
    validate(resolved(compose_cfg, *overrides), Path(CONFIG_DIR), host_checks=False)


# -- plan ------------------------------------------------------------------------------------------------
def test_the_worker_keeps_the_launchers_pythonpath_behind_the_checkout(compose_cfg, monkeypatch) -> None:
    # Packages installed with `pip install --target DIR` reach the worker through PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", "/opt/site")
    plan = get_engine("lightweight").plan(resolved(compose_cfg, "device=cpu"))
    assert plan.env["PYTHONPATH"] == SOURCE_ROOT + os.pathsep + "/opt/site"


def test_plan_renders_the_worker_command_and_the_worker_parses_it(compose_cfg) -> None:
    run = resolved(compose_cfg, "device=cpu", "engine.port=8123", "engine.max_batch_size=8",
                   "engine.api_key=sekrit", "engine.torch_threads=1")  # fmt: skip
    plan = get_engine("lightweight").plan(run)
    assert plan.argv[1:3] == ("-m", LIGHTWEIGHT_MODULE)
    assert "sekrit" not in " ".join(plan.argv), "the API key must not be on the command line"
    assert plan.env[API_KEY_ENV] == "sekrit" and plan.env["PYTHONPATH"].split(os.pathsep)[0] == SOURCE_ROOT
    assert "sekrit" not in plan.shell_command() and "sekrit" not in str(plan.to_dict())
    options = WorkerOptions.parse(list(plan.argv[3:]))
    assert options == get_engine("lightweight").worker_options(run)
    assert (options.port, options.max_batch_size, options.device, options.backend) == (
        8123,
        8,
        "cpu",
        "transformers",
    )
    assert (
        options.max_model_len == 1024 and options.served_model_name == "tiny" and options.torch_threads == 1
    )
    assert options.low_bit is None and options.dtype == "auto"
    assert plan.probe.base_url == "http://127.0.0.1:8123" and plan.probe.api_key == "sekrit"


def test_plan_for_ipex_llm_passes_the_format_and_interpreter(compose_cfg) -> None:
    run = resolved(compose_cfg, "device=cpu", "engine.backend=ipex_llm", "low_bit=sym_int8",
                   "engine.python=/opt/ipex/bin/python")  # fmt: skip
    plan = get_engine("lightweight").plan(run)
    options = WorkerOptions.parse(list(plan.argv[3:]))
    assert plan.argv[0] == "/opt/ipex/bin/python"
    assert (options.backend, options.low_bit) == ("ipex_llm", "sym_int8")
    assert get_engine("lightweight").required_module(run) == "ipex_llm"


def test_low_bit_auto_means_the_backends_default(compose_cfg) -> None:
    assert resolved(compose_cfg, "device=cpu").low_bit.name == "none"
    assert resolved(compose_cfg, "device=cpu", "engine.backend=ipex_llm").low_bit.name == "sym_int4"


def test_low_bit_picks_the_transformers_dtype(compose_cfg) -> None:
    run = resolved(compose_cfg, "device=cpu", "low_bit=bf16")
    assert WorkerOptions.parse(list(get_engine("lightweight").plan(run).argv[3:])).dtype == "bfloat16"


def test_worker_options_round_trip() -> None:
    options = WorkerOptions(
        model="/m", served_model_name="m", tokenizer="/t", host="0.0.0.0", port=9, backend="ipex_llm",
        device="xpu", dtype="float16", low_bit="fp8", model_impl="generic", max_batch_size=3,
        max_waiting_requests=0, max_model_len=77, trust_remote_code=True, torch_threads=2,
        model_process=False, log_level="debug",
    )  # fmt: skip
    assert WorkerOptions.parse(options.to_argv()) == options


# -- validation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key", "fragments"),
    [
        (["low_bit=sym_int4"], "low_bit", ["engine.backend=ipex_llm", "Valid choices: bf16, fp16, none"]),
        # Not "set engine.backend=ipex_llm": ipex-llm refuses fp8 on cpu too (issue 13 item 5).
        (["low_bit=fp8_e4m3"], "low_bit", ["ipex-llm runs only on xpu, not on cpu"]),
        (["engine.backend=ipex_llm", "low_bit=fp16"], "low_bit", ["only on xpu", "Intel GPUs"]),
        (["engine.backend=ipex_llm", "low_bit=fp8"], "low_bit", ["only on xpu"]),
        (["engine.backend=ipex_llm", "low_bit=fp6"], "low_bit", ["only on xpu"]),
        (["engine.backend=ipex_llm", "low_bit=none"], "low_bit", ["load_in_low_bit", "sym_int4, sym_int5"]),
        (["engine.backend=ipex_llm", "device=cuda", "device.count=1"], "device", ["Valid choices: cpu, xpu"]),
        (["engine.backend=onnx"], "engine.backend", ["Valid choices: transformers, ipex_llm"]),
        (["engine.backend=ipex_llm", "engine.model_impl=fused"], "engine.model_impl", ["auto, generic"]),
        (["engine.backend=ipex_llm", "engine.model_impl=fast"], "engine.model_impl", ["auto, generic"]),
        (["engine.model_impl=magic"], "engine.model_impl", ["auto", "generic"]),
        (["engine.dtype=int3"], "engine.dtype", ["float32"]),
        (["low_bit=fp16", "engine.dtype=bfloat16"], "engine.dtype", ["float16"]),
        (["engine.max_batch_size=0"], "engine.max_batch_size", ["at least 1"]),
        (["engine.max_waiting_requests=-1"], "engine.max_waiting_requests", ["0 or more"]),
        (["engine.max_model_len=-5"], "engine.max_model_len", ["at least 1"]),
        (["engine.log_level=loud"], "engine.log_level", ["debug"]),
        (["benchmark.input_len=1000", "benchmark.output_len=100"], "benchmark.input_len", ["1024"]),
    ],
)
def test_config_rule(compose_cfg, overrides: list[str], key: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        check(compose_cfg, "device=cpu", *overrides)
    assert info.value.key == key
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["low_bit=bf16"],
        ["engine.backend=ipex_llm", "low_bit=sym_int4"],
        ["engine.backend=ipex_llm", "low_bit=sym_int8"],
        ["engine.backend=ipex_llm", "low_bit=woq_int4"],
        ["engine.backend=ipex_llm", "low_bit=fp8", "device=xpu", "device.count=1"],
        ["engine.backend=ipex_llm", "low_bit=fp16", "device=xpu", "device.count=1"],
        ["device=cuda", "device.count=1", "engine.model_impl=generic"],
    ],
)
def test_valid_configs_pass(compose_cfg, overrides: list[str]) -> None:
    check(compose_cfg, "device=cpu", *overrides)


def test_interpreter_without_ipex_llm_is_refused(compose_cfg, tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    run = resolved(
        compose_cfg, "device=cpu", "engine.backend=ipex_llm", f"engine.python={fake}", "engine.port=0"
    )
    with pytest.raises(ConfigError) as info:
        validate(run, Path(CONFIG_DIR), host_checks=True)
    assert info.value.key == "engine.python" and "cannot import 'ipex_llm'" in str(info.value)


# -- sampler -----------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")

from llmstack.workers.detokenizer import (  # noqa: E402
    IncrementalDetokenizer,
    StopChecker,
    decoder_for,
    decoders_for,
)
from llmstack.workers.metrics import WorkerMetrics  # noqa: E402
from llmstack.workers.sampling import SamplerRow, SamplingParams, make_generator, sample  # noqa: E402


def row(
    params: SamplingParams, output: list[int] | None = None, eos: frozenset[int] = frozenset({2})
) -> SamplerRow:
    generator = None if params.greedy else make_generator(params.seed, torch.device("cpu"))
    return SamplerRow(params, [1, 5, 6], output or [], eos, generator)


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [
        row(SamplingParams(8, temperature=0.0)),
        row(SamplingParams(8, top_k=1)),
        row(SamplingParams(8, 0.0)),
    ]
    assert sample(logits, rows) == logits.argmax(-1).tolist()


def test_greedy_ties_go_to_the_first_maximum_as_in_torch() -> None:
    logits = torch.zeros(2, 16)
    logits[0, [3, 9]] = 5.0
    logits[1, [0, 15]] = float("inf")
    greedy = SamplingParams(8, temperature=0.0)
    assert sample(logits, [row(greedy), row(greedy)]) == [3, 0] == logits.argmax(-1).tolist()
    # A strided view (the greedy subset of a mixed batch) reads the right rows.
    assert sample(logits.t().contiguous().t(), [row(greedy), row(greedy)]) == [3, 0]


def test_seeded_sampling_repeats_whatever_shares_the_batch() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    seeded = SamplingParams(8, temperature=1.0, seed=1234)

    alone_row = row(seeded)
    alone = [sample(logits[0:1], [alone_row])[0] for _ in range(30)]
    others = SamplingParams(8, temperature=0.9, seed=7), SamplingParams(8, temperature=0.0)
    rows = [row(others[0]), row(seeded), row(others[1])]
    batch_logits = torch.stack([logits[1], logits[0], logits[2]])
    in_batch = [sample(batch_logits, rows)[1] for _ in range(30)]
    assert in_batch == alone
    assert len(set(alone)) > 1, "sampling at temperature 1 never varied"
    other_seed = row(SamplingParams(8, temperature=1.0, seed=4321))
    assert [sample(logits[0:1], [other_seed])[0] for _ in range(30)] != alone


def test_top_k_and_top_p_restrict_the_draws() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0, -2.0]])
    top2 = row(SamplingParams(8, temperature=1.0, top_k=2, seed=0))
    assert {sample(logits, [top2])[0] for _ in range(200)} <= {0, 1}
    # p(token 0) = 0.66 of the mass: top_p 0.5 keeps token 0 alone.
    nucleus = row(SamplingParams(8, temperature=1.0, top_p=0.5, seed=0))
    assert {sample(logits, [nucleus])[0] for _ in range(100)} == {0}


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 0.5]])
    params = SamplingParams(8, temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    assert sample(logits, [row(params, output=[4])]) == [1]  # EOS (2) and stop token 3 are masked
    assert sample(logits, [row(params, output=[4, 4])]) == [2]  # min_tokens reached


def test_repetition_penalty_discourages_seen_tokens() -> None:
    # Token 5 is in the prompt ([1, 5, 6]), token 0 in the output.
    logits = torch.tensor([[3.0, 0.0, 0.0, 2.9, 0.0, 2.95]])
    assert sample(logits, [row(SamplingParams(8, temperature=0.0), output=[0])]) == [0]
    assert sample(logits, [row(SamplingParams(8, temperature=0.0, repetition_penalty=2.0), output=[0])]) == [
        3
    ]
    # Presence and frequency penalties count output tokens only.
    assert sample(logits, [row(SamplingParams(8, temperature=0.0, presence_penalty=1.0), output=[0])]) == [5]


# -- detokenizer and stop strings --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from llmstack.models.tiny import ensure_tiny_model

    return AutoTokenizer.from_pretrained(str(ensure_tiny_model()))


@pytest.mark.parametrize("text", ["the quick brown fox jumps", "héllo wörld → 世界 ok", "a\nb  c\t d"])
def test_incremental_detokenization_equals_a_full_decode(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decode = decoder_for(tokenizer)
    detok = IncrementalDetokenizer(decode, [1])
    deltas = [detok.push(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas), "a partial character was released"


def test_an_output_cut_inside_a_character_ends_without_a_replacement_character(tokenizer) -> None:
    """vLLM emits nothing for the bytes of a character the output did not finish."""
    wide = tokenizer("世", add_special_tokens=False)["input_ids"]
    assert len(wide) > 1, "the tiny vocabulary spells 世 in bytes"
    detok = IncrementalDetokenizer(decoder_for(tokenizer), [1])
    ids = tokenizer("ab", add_special_tokens=False)["input_ids"] + wide[:-1]
    text = "".join(detok.push(t) for t in ids) + detok.flush()
    assert text == "ab"


def test_a_prefill_that_fails_fails_only_its_own_request(tokenizer) -> None:
    """Four requests admitted together; one cannot be set up (its seed), the model cannot take another.
    The first fails as it is admitted; the packed prefill fails, so the rest are prefilled one by one: the
    bad one fails with its reason, its KV state is released, and the other two are served."""
    import torch

    from llmstack.workers.detokenizer import decoders_for
    from llmstack.workers.scheduler import GenerationRequest, Scheduler

    poison = 999

    class PickyBackend:  # a backend whose embedding lookup fails on one token id
        device = torch.device("cpu")
        vocab_size = 1024
        max_batch_size = 4
        max_model_len = 64

        def __init__(self) -> None:
            self.live: set[int] = set()

        def _logits(self, n: int) -> torch.Tensor:
            logits = torch.zeros(n, self.vocab_size)
            logits[:, 5] = 1.0
            return logits

        def prefill(self, seq_ids, prompts) -> torch.Tensor:
            self.live.update(seq_ids)  # slots taken before the lookup fails, as the fused backend does
            if any(poison in p for p in prompts):
                raise IndexError("index out of range in self")
            return self._logits(len(seq_ids))

        def decode(self, seq_ids, token_ids) -> torch.Tensor:
            return self._logits(len(seq_ids))

        def release(self, seq_id: int) -> None:
            self.live.discard(seq_id)

    updates: dict[str, list] = {}
    backend = PickyBackend()

    def publish(batch, running: int, waiting: int) -> None:
        for request_id, update in batch:
            updates.setdefault(request_id, []).append(update)

    scheduler = Scheduler(backend, decoders_for(tokenizer), [2], publish=publish)  # type: ignore[arg-type]
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    # A seed torch's generator refuses: that request fails as it is admitted, before the others' prefill.
    unseedable = SamplingParams(max_tokens=3, temperature=1.0, seed=-(2**63) - 1)
    jobs = (("a", [1, 7], greedy), ("unseedable", [1, 7], unseedable), ("bad", [1, poison], greedy),
            ("b", [1, 8], greedy))  # fmt: skip
    for name, prompt, params in jobs:
        scheduler.submit(GenerationRequest(name, prompt, params))
    thread = scheduler.start()
    deadline = time.monotonic() + 10
    while len([u for us in updates.values() for u in us if u.finish_reason]) < len(jobs):
        assert time.monotonic() < deadline, updates
        time.sleep(0.01)
    scheduler.stop()
    thread.join(5)
    finals = {name: us[-1] for name, us in updates.items()}
    assert finals["bad"].finish_reason == "error" and "IndexError" in finals["bad"].error
    assert finals["unseedable"].finish_reason == "error" and "Overflow" in finals["unseedable"].error
    assert finals["a"].finish_reason == finals["b"].finish_reason == "length"
    assert finals["a"].completion_tokens == finals["b"].completion_tokens == 3
    assert backend.live == set(), "a sequence kept its KV state"


def test_stop_string_split_over_deltas_is_found_and_cut() -> None:
    stops = StopChecker(["STOP"])
    released = []
    for delta in ["hello S", "T", "O", "Pignored"]:
        text, hit = stops.add(delta)
        released.append(text)
        if hit:
            break
    assert hit == "STOP"
    assert "".join(released) == "hello "


def test_held_back_text_is_released_at_the_end() -> None:
    stops = StopChecker(["</end>"])
    released = [stops.add(d)[0] for d in ["abc", "def</e"]]
    assert "".join(released) + stops.finish() == "abcdef</e"
    assert not released[-1].endswith("</e"), "a possible stop-string prefix was released early"


# -- metrics -----------------------------------------------------------------------------------------------
def test_metrics_render_prometheus_text() -> None:
    metrics = WorkerMetrics("tiny")
    metrics.running = lambda: 3
    metrics.generation_tokens = 42
    for value in (0.003, 0.03, 30.0):
        metrics.ttft.observe(value)
    text = metrics.render()
    assert 'llmstack:num_requests_running{model_name="tiny"} 3' in text
    assert 'llmstack:generation_tokens_total{model_name="tiny"} 42' in text
    buckets = re.findall(r'time_to_first_token_seconds_bucket\{model_name="tiny",le="([^"]+)"\} (\d+)', text)
    counts = [int(n) for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] == 3 and buckets[-1][0] == "+Inf"
    assert dict(buckets)["0.005"] == "1" and dict(buckets)["0.04"] == "2"
    assert 'llmstack:time_to_first_token_seconds_count{model_name="tiny"} 3' in text
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r"llmstack:[a-z0-9_]+\{[^}]*\} [0-9.e+\-Inf]+", line), (
            line
        )


# -- admission and dispatch in the server process -----------------------------------------------------------
def test_model_client_admits_batch_plus_queue_and_counts_what_clients_get() -> None:
    import asyncio

    from llmstack.workers.backends.base import BackendInfo
    from llmstack.workers.model_client import ModelClient, ModelFacts, Overloaded
    from llmstack.workers.scheduler import Update

    sent: list[str] = []
    aborted: list[str] = []

    class Recording(ModelClient):  # the model loop's end of the pipe, recorded
        def alive(self) -> bool:
            return True

        def _send(self, request) -> None:
            sent.append(request.request_id)

        def _send_abort(self, request_id: str) -> None:
            aborted.append(request_id)

    facts = ModelFacts(
        1, 64, [2], BackendInfo("transformers", "fused", "cpu", "float32", None, "llama"), 1024
    )

    async def main() -> WorkerMetrics:
        client = Recording(facts, max_waiting_requests=1, metrics=WorkerMetrics("tiny"))
        client._loop = asyncio.get_running_loop()
        first, first_stream = client.submit([1, 2, 3], SamplingParams(4), "cmpl")
        second, _ = client.submit([1, 2], SamplingParams(4), "cmpl")
        with pytest.raises(Overloaded, match="max_batch_size 1 \\+ max_waiting_requests 1"):
            client.submit([1], SamplingParams(4), "cmpl")
        client._dispatch([(first, Update("a", 1, 7)), (first, Update("b", 2, 8, "length"))], 1, 1)
        assert [u.text for u in await first_stream.next_batch()] == ["a", "b"]
        client.abort(second)
        client.abort(second)  # twice: counted once
        third, _ = client.submit([1], SamplingParams(4), "cmpl")  # both slots are free again
        client._dispatch([(second, Update("late", 1, 9))], 1, 0)  # an aborted request's update is dropped
        assert sent == [first, second, third] and aborted == [second]
        assert client.snapshot() == {"running": 1, "waiting": 0, "open_requests": 1}
        return client.metrics

    metrics = asyncio.run(main())
    assert (metrics.prompt_tokens, metrics.generation_tokens, metrics.rejected) == (6, 2, 1)
    assert metrics.finished["length"] == 1 and metrics.finished["abort"] == 1
    assert metrics.ttft.count == 1 and metrics.e2e.count == 1


def test_the_server_process_makes_the_text_of_requests_without_stop_strings(tokenizer) -> None:
    """The model process sends token ids only for requests without stop strings (Scheduler
    text_for_stops_only); the server process's detokenizer must give the text the scheduler would have."""
    import asyncio

    from llmstack.workers.backends.base import BackendInfo
    from llmstack.workers.model_client import ModelClient, ModelFacts
    from llmstack.workers.scheduler import Update

    class Client(ModelClient):
        def alive(self) -> bool:
            return True

        def _send(self, request) -> None:
            pass

    facts = ModelFacts(
        4, 64, [2], BackendInfo("transformers", "fused", "cpu", "float32", None, "llama"), 1024
    )
    decoders = decoders_for(tokenizer)
    prompt = tokenizer("say", add_special_tokens=False)["input_ids"]
    # Ends inside a multi-byte character: the last update flushes what was held back, which is no text
    # (the bytes of an unfinished character), as in the scheduler.
    output = tokenizer(" héllo 世界", add_special_tokens=False)["input_ids"]
    output = output + tokenizer("界", add_special_tokens=False)["input_ids"][:1]
    reference = IncrementalDetokenizer(decoders[True], prompt)
    expected = [reference.push(t) for t in output]
    expected[-1] += reference.flush()

    async def main() -> None:
        client = Client(facts, max_waiting_requests=4, metrics=WorkerMetrics("tiny"), decoders=decoders)
        client._loop = asyncio.get_running_loop()
        plain, plain_stream = client.submit(prompt, SamplingParams(len(output)), "cmpl")
        stopped, stopped_stream = client.submit(prompt, SamplingParams(8, stop=("x",)), "cmpl")
        failed, failed_stream = client.submit(prompt, SamplingParams(8), "cmpl")
        last = len(output) - 1
        client._dispatch(
            [(plain, Update("", i + 1, t, "length" if i == last else None)) for i, t in enumerate(output)]
            + [(stopped, Update("made by the model", 1, output[0])), (failed, Update("", 0, -1, "error"))],
            3,
            0,
        )
        assert [u.text for u in await plain_stream.next_batch()] == expected
        full = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]
        assert "".join(expected) == full.rstrip("\ufffd") and full.endswith("\ufffd")
        # Requests with stop strings keep the model's text; an update without a token adds none.
        assert [u.text for u in await stopped_stream.next_batch()] == ["made by the model"]
        assert [u.text for u in await failed_stream.next_batch()] == [""]

    asyncio.run(main())


def test_a_token_the_server_process_cannot_decode_fails_only_its_request(tokenizer) -> None:
    """One iteration's updates for two requests; making the text of one of them raises. That request ends
    with the error and the model loop is told to drop it; the other gets its text."""
    import asyncio

    from llmstack.workers.backends.base import BackendInfo
    from llmstack.workers.model_client import ModelClient, ModelFacts
    from llmstack.workers.scheduler import Update

    poison = 999
    aborted: list[str] = []

    class Client(ModelClient):
        def alive(self) -> bool:
            return True

        def _send(self, request) -> None:
            pass

        def _send_abort(self, request_id: str) -> None:
            aborted.append(request_id)

    def failing_on_poison(decode):
        def decode_or_fail(ids: list[int]) -> str:
            if poison in ids:
                raise ValueError("undecodable")
            return decode(ids)

        return decode_or_fail

    decoders = {skip: failing_on_poison(decode) for skip, decode in decoders_for(tokenizer).items()}
    facts = ModelFacts(
        4, 64, [2], BackendInfo("transformers", "fused", "cpu", "float32", None, "llama"), 1024
    )

    async def main() -> None:
        client = Client(facts, max_waiting_requests=4, metrics=WorkerMetrics("tiny"), decoders=decoders)
        client._loop = asyncio.get_running_loop()
        bad, bad_stream = client.submit([1, 7], SamplingParams(8), "cmpl")
        good, good_stream = client.submit([1, 7], SamplingParams(8), "cmpl")
        word = tokenizer(" hello", add_special_tokens=False)["input_ids"]
        client._dispatch([(bad, Update("", 1, poison)), *((good, Update("", 1, t)) for t in word)], 2, 0)
        (failed,) = await bad_stream.next_batch()
        assert failed.finish_reason == "error" and "undecodable" in failed.error
        assert aborted == [bad]
        assert "".join(u.text for u in await good_stream.next_batch()) == " hello"
        assert client.snapshot()["open_requests"] == 1

    asyncio.run(main())


def test_auto_model_impl_picks_the_cuda_graph_decoder_on_cuda_only() -> None:
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from llmstack.models.tiny import ensure_tiny_model
    from llmstack.workers.backends.loader import auto_model_impl

    model = AutoModelForCausalLM.from_pretrained(str(ensure_tiny_model()))
    assert auto_model_impl("cuda", model, 256) == "fast"
    # Elsewhere the fused decoder (or the generic forward where it cannot run) is chosen later.
    assert auto_model_impl("cpu", model, 256) == "auto"
    assert auto_model_impl("xpu", model, 256) == "auto"
    model.config.model_type = "gpt2"  # an architecture the fast decoder does not implement
    assert auto_model_impl("cuda", model, 256) == "auto"
