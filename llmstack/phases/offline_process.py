"""The offline throughput measurement, run as its own process under the engine's interpreter:

    python -m llmstack.phases.offline_process --spec spec.json

The spec (written by `phases/offline_throughput.py`) holds the engine's own command-line arguments, the
prompts with their output lengths, the sampling settings and where to write the result. This process loads
vLLM's in-process engine (`vllm.LLM`, or ipex-llm's `IPEXLLMClass`) from those arguments, generates the
warm-up prompts (untimed), then all measured prompts in one `generate` call, timed, and writes the token
counts the engine returned. It imports only the standard library, vLLM and `llmstack.results.files` (itself
standard library only): the engine's interpreter may be another virtual environment that has no llmstack
dependencies.

vLLM starts worker processes; on platforms that spawn them, they re-import the main module, hence the
`if __name__ == "__main__"` guard at the bottom.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from typing import Any

# Lines with this prefix are progress the launcher shows on its console.
PROGRESS_PREFIX = "llmstack-offline:"


def say(message: str) -> None:
    print(f"{PROGRESS_PREFIX} {message}", flush=True)


def load_llm_class(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def engine_args_from_argv(argv: list[str]) -> Any:
    """vLLM's EngineArgs from the server's arguments; frontend-only flags are reported and dropped."""
    from vllm.engine.arg_utils import EngineArgs

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM before 0.11
        from vllm.utils import FlexibleArgumentParser  # type: ignore[attr-defined,no-redef]

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        say(f"ignoring arguments the in-process engine does not take: {' '.join(unknown)}")
    return EngineArgs.from_cli_args(args)


def split_low_bit(argv: list[str]) -> tuple[list[str], str | None]:
    """ipex-llm's `--load-in-low-bit X` is an argument of its server and a keyword of its LLM class, not an
    EngineArgs field: take it out of the arguments, to be passed on by name."""
    rest: list[str] = []
    low_bit = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--load-in-low-bit" and i + 1 < len(argv):
            low_bit = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--load-in-low-bit="):
            low_bit = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return rest, low_bit


def build_llm(llm_class: Any, engine_args: Any, low_bit: str | None = None) -> Any:
    if low_bit is not None:  # ipex-llm: LLM(..., load_in_low_bit="fp8"), as its offline examples do
        return llm_class(**dataclasses.asdict(engine_args), load_in_low_bit=low_bit)
    if hasattr(llm_class, "from_engine_args"):
        return llm_class.from_engine_args(engine_args)
    return llm_class(**dataclasses.asdict(engine_args))


def sampling_params(spec: dict[str, Any], output_lens: list[int]) -> list[Any]:
    from vllm import SamplingParams

    s = spec["sampling"]
    return [
        SamplingParams(
            n=1,
            temperature=s["temperature"],
            top_p=s["top_p"],
            ignore_eos=s["ignore_eos"],
            max_tokens=n,
            seed=s.get("seed"),
        )
        for n in output_lens
    ]


def line_progress() -> Any:
    """A tqdm for vLLM's generate() that prints a plain line every few seconds instead of carriage-return
    redraws, which a log file (and the launcher's console echo of it) cannot show."""
    from tqdm import tqdm

    interval = float(os.environ.get("LLMSTACK_OFFLINE_PROGRESS_S", "10"))

    class LineProgress(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(mininterval=interval, maxinterval=interval, dynamic_ncols=False, file=sys.stdout)
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            shown = getattr(self, "_llmstack_shown", 0)
            if self.n and self.n != shown:  # close() redraws the last state: once is enough
                self._llmstack_shown = self.n
                say(f"{self.desc or 'progress'}: {self.n}/{self.total}")
            return True

    return LineProgress


def run(spec: dict[str, Any]) -> dict[str, Any]:
    llm_class = load_llm_class(spec["llm_class"])
    started = time.perf_counter()
    say("loading the model")
    argv, low_bit = split_low_bit(spec["engine_args"])
    llm = build_llm(llm_class, engine_args_from_argv(argv), low_bit)
    load_s = time.perf_counter() - started
    say(f"model loaded in {load_s:.1f} s")

    warm_prompts = spec["warmup"]["prompts"]
    warmup_s = 0.0
    if warm_prompts:
        say(f"warm-up: {len(warm_prompts)} prompts")
        t0 = time.perf_counter()
        llm.generate(warm_prompts, sampling_params(spec, spec["warmup"]["output_lens"]), use_tqdm=False)
        warmup_s = time.perf_counter() - t0

    prompts = spec["prompts"]
    params = sampling_params(spec, spec["output_lens"])
    say(f"measuring: {len(prompts)} prompts in one generate() call")
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=line_progress())
    elapsed = time.perf_counter() - start

    per_request = []
    finish_reasons: dict[str, int] = {}
    for out in outputs:
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        per_request.append([len(out.prompt_token_ids or []), completion_tokens])
        for c in out.outputs:
            reason = str(c.finish_reason)
            finish_reasons[reason] = finish_reasons.get(reason, 0) + 1
    import vllm

    return {
        "elapsed_time": elapsed,
        "num_requests": len(outputs),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "warmup_requests": len(warm_prompts),
        "per_request_tokens": per_request,
        "finish_reasons": finish_reasons,
        "vllm_version": getattr(vllm, "__version__", None),
        "llm_class": spec["llm_class"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmstack.phases.offline_process",
        description="Offline throughput of vLLM's in-process engine.",
    )
    parser.add_argument("--spec", required=True, help="the JSON spec written by the offline_throughput phase")
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    result = run(spec)
    from llmstack.results.files import write_json_atomic

    write_json_atomic(spec["result_path"], result)
    say(f"done: {result['num_requests']} prompts in {result['elapsed_time']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
