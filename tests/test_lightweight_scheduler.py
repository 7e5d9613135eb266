"""The scheduler with the real tiny model in process: batching, stop conditions, sampling, aborts.

No HTTP here (test_lightweight_integration.py covers it): requests go straight to `Scheduler.submit`, and the
scheduler runs in a thread and publishes its updates to the test. Every model implementation (fused,
generic, fast) runs every test. About 15 s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmstack.models.tiny import ensure_tiny_model  # noqa: E402
from llmstack.workers.backends import cpu_kernels  # noqa: E402
from llmstack.workers.backends.loader import LoadedModel, load  # noqa: E402
from llmstack.workers.detokenizer import decoders_for  # noqa: E402
from llmstack.workers.protocol import WorkerOptions  # noqa: E402
from llmstack.workers.sampling import SamplingParams  # noqa: E402
from llmstack.workers.scheduler import GenerationRequest, Scheduler, Update  # noqa: E402

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 96


@dataclass
class Outcome:
    updates: list[Update] = field(default_factory=list)

    @property
    def final(self) -> Update:
        return self.updates[-1]

    @property
    def tokens(self) -> list[int]:
        return [u.token_id for u in self.updates if u.token_id >= 0]

    @property
    def text(self) -> str:
        return "".join(u.text for u in self.updates)


def load_tiny(model_impl: str, max_batch_size: int = 4) -> LoadedModel:
    options = WorkerOptions(
        model=str(ensure_tiny_model()), served_model_name="tiny", model_impl=model_impl,
        max_batch_size=max_batch_size, max_model_len=MAX_MODEL_LEN, torch_threads=1,
    )  # fmt: skip
    return load(options)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ensure_tiny_model())).eval()


@pytest.fixture(scope="module", params=["fused", "fused-torch-attention", "generic", "fast"])
def loaded(request: pytest.FixtureRequest) -> Iterator[LoadedModel]:
    if request.param != "fused-torch-attention":
        yield load_tiny(request.param)
        return
    # The fused decoder without llmstack's C attention kernel (no compiler, or switched off).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cpu_kernels.DISABLE_ENV, "0")
        loaded = load_tiny("fused")
    assert loaded.backend.info().extra["attention"] == "torch-sdpa"
    yield loaded


def run(
    loaded: LoadedModel,
    jobs: list[tuple[list[int], SamplingParams]],
    *,
    eos: list[int] | None = None,
    during: Callable[[Scheduler, list[str], set[str]], None] | None = None,
    text_for_stops_only: bool = False,
) -> tuple[list[Outcome], Scheduler, list[tuple[int, int]]]:
    """Submit every job at once; return each one's updates, and the published (running, waiting) counts.

    `during(scheduler, ids, pending)` runs right after the submissions; a request it aborts must be taken
    out of `pending` (an aborted request gets no final update).
    """
    ids = [f"r{i}" for i in range(len(jobs))]
    outcomes = {request_id: Outcome() for request_id in ids}
    pending = set(ids)
    counts: list[tuple[int, int]] = []
    finished = threading.Event()
    lock = threading.Lock()

    def publish(updates: list[tuple[str, Update]], running: int, waiting: int) -> None:
        with lock:
            for request_id, update in updates:
                outcomes[request_id].updates.append(update)
                if update.finish_reason is not None:
                    pending.discard(request_id)
            counts.append((running, waiting))
            if not pending:
                finished.set()

    scheduler = Scheduler(
        loaded.backend,
        decoders_for(loaded.tokenizer),
        loaded.eos_token_ids if eos is None else eos,
        publish=publish,
        text_for_stops_only=text_for_stops_only,
    )
    scheduler.start()
    try:
        for request_id, (prompt_ids, params) in zip(ids, jobs, strict=True):
            scheduler.submit(GenerationRequest(request_id, prompt_ids, params))
        if during is not None:
            with lock:
                during(scheduler, ids, pending)
                if not pending:
                    finished.set()
        assert finished.wait(120), f"requests never finished: {sorted(pending)}"
        for _ in range(100):  # the scheduler publishes its counts once it is idle
            if counts and counts[-1] == (0, 0):
                break
            finished.wait(0.05)
    finally:
        scheduler.stop()
    return [outcomes[request_id] for request_id in ids], scheduler, counts


def prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(4, 1000, (length - 1,), generator=g).tolist()]


def generate(reference: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_more_requests_than_slots_all_match_generate(loaded: LoadedModel, reference: torch.nn.Module) -> None:
    # Six greedy requests, four slots: two wait, then join as others leave (different max_tokens).
    jobs = [(prompt(i, 5 + 7 * i), SamplingParams(max_tokens=8 + 5 * i, temperature=0.0)) for i in range(6)]
    outcomes, _, counts = run(loaded, jobs)
    for (ids, params), outcome in zip(jobs, outcomes, strict=True):
        want = generate(reference, ids, params.max_tokens)
        assert outcome.tokens == want
        assert outcome.final.finish_reason == ("stop" if want[-1] in loaded.eos_token_ids else "length")
        assert outcome.final.completion_tokens == len(want)
    assert max(running for running, _ in counts) == 4, "the batch never filled its four slots"
    assert any(waiting > 0 for _, waiting in counts), "no request ever waited for a slot"
    assert counts[-1] == (0, 0)


def test_eos_stops_unless_ignored_and_min_tokens_masks_it(
    loaded: LoadedModel, reference: torch.nn.Module
) -> None:
    ids = prompt(11, 12)
    first = generate(reference, ids, 1)[0]
    # Pretend the first greedy token is EOS.
    jobs = [
        (ids, SamplingParams(max_tokens=10, temperature=0.0)),
        (ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)),
        (ids, SamplingParams(max_tokens=10, temperature=0.0, min_tokens=3)),
    ]
    stopped, ignored, delayed = run(loaded, jobs, eos=[first])[0]
    assert (stopped.final.finish_reason, stopped.tokens) == ("stop", [first])
    assert stopped.final.stop_reason is None
    assert (
        ignored.final.finish_reason == "length" and len(ignored.tokens) == 10 and ignored.tokens[0] == first
    )
    assert len(delayed.tokens) >= 3 and first not in delayed.tokens[:3]


def test_stop_token_ids_and_stop_strings(loaded: LoadedModel, reference: torch.nn.Module) -> None:
    ids = prompt(12, 9)
    want = generate(reference, ids, 12)
    text = loaded.tokenizer.decode(want, skip_special_tokens=True)
    stop_text = text[len(text) // 2 : len(text) // 2 + 3]
    jobs = [
        (ids, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(want[4],))),
        (ids, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop_text,))),
    ]
    by_token, by_string = run(loaded, jobs)[0]
    cut = want.index(want[4]) + 1
    assert by_token.tokens == want[:cut]
    assert (by_token.final.finish_reason, by_token.final.stop_reason) == ("stop", want[4])
    assert (by_string.final.finish_reason, by_string.final.stop_reason) == ("stop", stop_text)
    assert by_string.text == text[: text.index(stop_text)]


def test_in_the_model_process_only_stop_string_requests_get_text(loaded: LoadedModel) -> None:
    # The model process leaves the text of the others to the server process (text_for_stops_only).
    ids = prompt(13, 9)
    jobs = [
        (ids, SamplingParams(max_tokens=10, temperature=0.0)),
        (ids, SamplingParams(max_tokens=10, temperature=0.0, stop=("\x00never",))),
    ]
    plain, with_stops = run(loaded, jobs, text_for_stops_only=True)[0]
    reference = run(loaded, jobs)[0]
    assert plain.tokens == with_stops.tokens == reference[0].tokens
    assert plain.text == "" and plain.final.finish_reason == "length"
    assert with_stops.text == reference[1].text == reference[0].text != ""


def test_the_context_limit_ends_with_length(loaded: LoadedModel) -> None:
    ids = prompt(13, MAX_MODEL_LEN - 4)
    (outcome,), _, _ = run(loaded, [(ids, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))])
    assert outcome.final.finish_reason == "length" and len(outcome.tokens) == 4


def test_seeded_sampling_repeats(loaded: LoadedModel) -> None:
    ids = prompt(14, 10)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    other = SamplingParams(max_tokens=16, temperature=1.0, seed=100, ignore_eos=True)
    first, second, third = run(loaded, [(ids, params), (ids, params), (ids, other)])[0]
    assert first.tokens == second.tokens
    assert first.tokens != third.tokens


def test_aborted_requests_free_their_slot() -> None:
    loaded = load_tiny("auto", max_batch_size=1)
    long = SamplingParams(max_tokens=MAX_MODEL_LEN - 8, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    def abort_two(scheduler: Scheduler, ids: list[str], pending: set[str]) -> None:
        scheduler.abort(ids[0])  # running (or about to be)
        scheduler.abort(ids[1])  # waiting behind it
        pending -= {ids[0], ids[1]}

    jobs = [(prompt(2, 4), long), (prompt(3, 4), long), (prompt(4, 4), short)]
    (first, second, third), scheduler, counts = run(loaded, jobs, during=abort_two)
    # The one slot went to the third request, which ran to its end.
    assert third.final.finish_reason == "length" and len(third.tokens) == 5
    assert all(u.finish_reason is None for u in first.updates + second.updates)
    assert len(first.tokens) < long.max_tokens and not second.tokens
    assert counts[-1] == (0, 0) and scheduler.snapshot()["running"] == 0
