"""Our lightweight worker on an NVIDIA GPU vs HF `generate` and `transformers serve --continuous-batching`.

Workload (issue 6): a random-weight model of Qwen2-0.5B shape in bf16, built here from a Qwen2Config (no
download), 128 prompt tokens, 256 output tokens, greedy, EOS ignored. Phases, in this order:

  1. build the model directory: weights, and a Qwen2-style byte-level BPE tokenizer whose 151,643 tokens
     are letter runs (" abcd", "xy"), so generated ids decode to real text and prompts of 128 words are
     128 tokens, with a chat template that renders the message as is;
  2. equivalence: greedy tokens of the fast backend (CUDA graphs) vs HF `generate` for the same prompts,
     sequences joining, leaving and decoding together at different positions; in float32 (must be equal)
     and bf16 (agreement reported: bf16 rounding differs between any two kernels);
  3. backend-only step times (no HTTP), graphs vs the same step run eagerly;
  4. HF `generate`, static batch of 1 and of 64 (no EOS token: exactly 256 new tokens);
  5. `transformers serve MODEL --continuous-batching` at concurrency 1 and 64;
  6. our worker (`python -m llmstack.workers.lightweight --model-impl fast`) at concurrency 1 and 64;
     with --variants also at 64: the same with `--model-in-thread` (the model loop in the HTTP process,
     not in its own), and `--model-impl fused` (no graphs); `--skip fused` leaves that one out.

Both servers get the same requests from llmstack's load generator (`run_load_sync`): streamed chat
completions, one random 128-word prompt each, max_tokens 256, temperature 0 (ours also gets ignore_eos;
transformers serve refuses unknown fields). Output tokens are counted from each response's `usage`.
A short table with the ratios is printed last; everything is also written to OUT/results.json.

    python benchmarks/lightweight_gpu.py --out $OUT                 # on the GPU machine
    .venv/bin/python benchmarks/lightweight_gpu.py --smoke --device cpu --out /tmp/lw   # the flow, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SERVED_NAME = "qwen2-0.5b-random"
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 256
EOS_ID = 151643  # Qwen2's <|endoftext|>; a random model almost never picks it, and ours ignores it anyway
# The tokenizer's ids: 256 byte symbols, then " a".." zzzz" (one token per word: prompts are drawn from the
# 4-letter ones), then "aa".."zzz"; <|endoftext|> at EOS_ID. Ids past it decode to nothing, as in Qwen2.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_PLAIN_WORDS = 26**2 + 26**3
PROMPT_IDS = (256 + 26 + 26**2 + 26**3, EOS_ID - _PLAIN_WORDS)
QWEN2_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
QWEN2_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
# --smoke: the same flow on a model small enough for a CPU.
SMOKE = dict(QWEN2_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"

T0 = time.monotonic()
# Past this (monotonic) time no wait is started: the whole run must end inside the device call's limit.
DEADLINE = [T0 + 580.0]


def time_left(cap: float) -> float:
    return max(5.0, min(cap, DEADLINE[0] - time.monotonic()))


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {message}", flush=True)


# -- 1. the model --------------------------------------------------------------------------------------------
def build_model(path: Path, shape: dict[str, Any], device: str) -> None:
    import torch
    import transformers

    config = transformers.Qwen2Config(
        **shape, bos_token_id=EOS_ID, eos_token_id=EOS_ID, use_sliding_window=False
    )
    torch.manual_seed(20261127)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, do_sample=False
    )
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    del model
    gc.collect()


def build_tokenizer() -> Any:
    """A byte-level BPE in Qwen2's layout (AutoTokenizer loads it as Qwen2Tokenizer), EOS_ID + 1 tokens."""
    import itertools

    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    space = "\u0120"  # byte-level " "
    # Merges apply lowest rank first: every " word" merge ranks before every plain one, so a word with its
    # leading space always merges left to right into one token.
    for n in range(1, 5):
        for letters in itertools.product(_LETTERS, repeat=n):
            if len(vocab) >= EOS_ID - _PLAIN_WORDS:
                break
            word = space + "".join(letters)
            merges.append((word[:-1], word[-1]))
            vocab[word] = len(vocab)
    for n in (2, 3):
        for letters in itertools.product(_LETTERS, repeat=n):
            word = "".join(letters)
            merges.append((word[:-1], word[-1]))
            vocab[word] = len(vocab)
    assert len(vocab) == EOS_ID, len(vocab)
    bpe = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="")
    )
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    tokenizer.add_tokens([AddedToken("<|endoftext|>", special=True)], special_tokens=True)
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low, high = PROMPT_IDS if vocab > PROMPT_IDS[1] else (1, vocab)
    return [[rng.randrange(low, high) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


# -- 2./3. equivalence and backend-only timings --------------------------------------------------------------
def equivalence(path: Path, device: str, dtype_name: str, new_tokens: int) -> dict[str, Any]:
    """Greedy tokens: fast backend (sequences joining/leaving, shared steps) vs HF generate alone."""
    import torch
    import transformers

    from llmstack.workers.backends.base import BackendInfo
    from llmstack.workers.backends.fast_llama import FastLlamaBackend

    dtype = getattr(torch, dtype_name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    vocab = ref.config.vocab_size
    rng = random.Random(5)
    lengths = {0: PROMPT_TOKENS, 1: 77, 2: 100, 3: 31}
    prompts = {s: [rng.randrange(1, min(vocab, EOS_ID)) for _ in range(n)] for s, n in lengths.items()}
    budget = {0: new_tokens // 2, 1: new_tokens, 2: new_tokens, 3: new_tokens}  # 0 leaves early
    expected = {}
    with torch.inference_mode():
        for s, prompt in prompts.items():
            out = ref.generate(
                torch.tensor([prompt], device=device),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                max_new_tokens=budget[s],
                min_new_tokens=budget[s],
                do_sample=False,
                pad_token_id=EOS_ID,
            )
            expected[s] = out[0, len(prompt) :].tolist()
    info = BackendInfo("transformers", "fast", device, dtype_name, None, "qwen2")
    backend = FastLlamaBackend(ref, max_batch_size=4, max_model_len=512, info=info)
    got: dict[int, list[int]] = {}

    def admit(ids: list[int]) -> None:
        logits = backend.prefill(ids, [prompts[s] for s in ids])
        for row, s in enumerate(ids):
            got[s] = [int(logits[row].argmax())]

    def step(ids: list[int]) -> None:
        logits = backend.decode(ids, [got[s][-1] for s in ids])
        for row, s in enumerate(ids):
            got[s].append(int(logits[row].argmax()))
        for s in ids:
            if len(got[s]) >= budget[s]:
                backend.release(s)

    with torch.inference_mode():
        admit([0])
        for _ in range(3):
            step([0])
        admit([1, 2])
        while len(got[0]) < budget[0]:
            step([2, 0, 1])
        admit([3])
        while any(len(got[s]) < budget[s] for s in (1, 2, 3)):
            step([s for s in (3, 1, 2) if len(got[s]) < budget[s]])
    agree = {}
    for s in prompts:
        same = next((i for i, (a, b) in enumerate(zip(got[s], expected[s], strict=True)) if a != b), None)
        agree[s] = budget[s] if same is None else same
    result = {
        "dtype": dtype_name,
        "equal": all(got[s] == expected[s] for s in prompts),
        "tokens_compared": sum(budget.values()),
        "agreeing_prefix": agree,
        "graphs": backend.info().extra.get("cuda_graphs"),
    }
    return result


def backend_timings(path: Path, device: str, max_batch: int, steps: int) -> dict[str, Any]:
    """Decode-step time of the fast backend alone (128-token prompts), CUDA graphs and the same step eager.

    Each step is sampled as the scheduler does (argmax, then to the host).
    """
    import torch
    import transformers

    from llmstack.workers.backends.base import BackendInfo
    from llmstack.workers.backends.fast_llama import FastLlamaBackend

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    info = BackendInfo("transformers", "fast", device, "bfloat16", None, "qwen2")
    started = time.perf_counter()
    backend = FastLlamaBackend(
        model, max_batch_size=max_batch, max_model_len=PROMPT_TOKENS + OUTPUT_TOKENS, info=info
    )
    out: dict[str, Any] = {"init_s": round(time.perf_counter() - started, 2), **info.extra}
    prompts = random_prompts(max_batch, backend.vocab_size, seed=9)
    with torch.inference_mode():
        for batch in sorted({1, max_batch}):
            ids = list(range(batch))
            backend.prefill(ids, prompts[:batch])  # warm-up of the prefill kernels
            for s in ids:
                backend.release(s)
            started = time.perf_counter()
            logits = backend.prefill(ids, prompts[:batch])
            out[f"prefill_b{batch}_ms"] = round((time.perf_counter() - started) * 1e3, 2)
            tokens = logits.argmax(-1).tolist()
            for mode in ("graphs", "eager"):
                backend.cuda_graphs = mode == "graphs" and device == "cuda"
                backend.decode(ids, tokens)  # warm-up
                started = time.perf_counter()
                for _ in range(steps):
                    tokens = backend.decode(ids, tokens).argmax(-1).tolist()
                elapsed = (time.perf_counter() - started) / steps
                out[f"decode_b{batch}_{mode}_ms"] = round(elapsed * 1e3, 3)
                out[f"decode_b{batch}_{mode}_tok_s"] = round(batch / elapsed)
            backend.cuda_graphs = device == "cuda"
            for s in ids:
                backend.release(s)
    return out


# -- 4. HF generate ------------------------------------------------------------------------------------------
def hf_generate(path: Path, device: str, batch: int, new_tokens: int) -> dict[str, Any]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    prompts = torch.tensor(random_prompts(batch, model.config.vocab_size, seed=batch), device=device)
    mask = torch.ones_like(prompts)
    # ignore_eos the cheapest way: no EOS at all (min_new_tokens would add a logits processor per step).
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.do_sample = False

    def run(tokens: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                prompts,
                attention_mask=mask,
                generation_config=config,
                max_new_tokens=tokens,
                pad_token_id=EOS_ID,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape == (batch, PROMPT_TOKENS + tokens), out.shape
        return time.perf_counter() - started

    run(4)  # warm-up
    elapsed = run(new_tokens)
    return {"batch": batch, "seconds": round(elapsed, 2), "tok_s": round(batch * new_tokens / elapsed, 1)}


# -- 5./6. servers under load --------------------------------------------------------------------------------
@contextlib.contextmanager
def server(argv: list[str], log_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "ab") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float, path: str) -> float:
    started = time.monotonic()
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"http://127.0.0.1:{port}{path}").status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout_s:.0f} s")


def chat_payloads(
    model: str, count: int, words: Callable[[list[int]], str], seed: int, ours: bool, max_tokens: int
) -> list[dict]:
    """Streamed chat requests, each with a fresh 128-token prompt (128 words, one token each)."""
    payloads = []
    for prompt in random_prompts(count, EOS_ID + 1, seed):
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": words(prompt)}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        if ours:
            body["ignore_eos"] = True
            body["stream_options"] = {"include_usage": True}
        payloads.append(body)
    return payloads


def load(port: int, payloads: list[dict], concurrency: int, timeout_s: float) -> dict[str, Any]:
    from llmstack.bench.loadgen import run_load_sync

    result = run_load_sync(
        f"http://127.0.0.1:{port}",
        payloads,
        endpoint="/v1/chat/completions",
        concurrency=concurrency,
        timeout_s=timeout_s,
    )
    ok = [r for r in result.records if r.success]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    ttfts = sorted(r.first_content_at - r.sent_at for r in ok if r.first_content_at and r.sent_at)
    errors = sorted({r.error for r in result.records if not r.success and r.error})[:3]
    return {
        "concurrency": concurrency,
        "requests": len(payloads),
        "ok": len(ok),
        "seconds": round(result.duration, 2),
        "output_tokens": tokens,
        "tokens_per_request": round(tokens / len(ok), 1) if ok else 0,
        "prompt_tokens_per_request": round(sum(prompt_tokens) / len(prompt_tokens), 1)
        if prompt_tokens
        else None,
        "tok_s": round(tokens / result.duration, 1) if result.duration > 0 else 0.0,
        "median_ttft_ms": round(ttfts[len(ttfts) // 2] * 1e3, 1) if ttfts else None,
        "errors": errors,
    }


def serve_and_load(
    name: str,
    argv: list[str],
    port: int,
    out: Path,
    env: dict[str, str],
    model_field: str,
    words: Callable[[list[int]], str],
    ours: bool,
    plan: list[tuple[int, int]],
    startup_s: float,
) -> dict[str, Any]:
    """Start a server, warm it up at concurrency 64, then run (concurrency, requests) for each of `plan`."""
    results: dict[str, Any] = {}
    with server(argv, out / f"{name}.log", env) as proc:
        # transformers serve's /v1/models scans the hub cache; its model is loaded before the port opens.
        ready_path = "/v1/models" if ours else "/health"
        results["ready_s"] = round(wait_ready(port, proc, time_left(startup_s), ready_path), 1)
        log(f"{name}: ready after {results['ready_s']} s")
        warm = chat_payloads(model_field, 64, words, seed=1, ours=ours, max_tokens=16)
        results["warmup"] = load(port, warm, 64, timeout_s=time_left(300))
        log(f"{name}: warm-up {results['warmup']['ok']}/64 ok {results['warmup']['errors']}")
        for concurrency, requests in plan:
            payloads = chat_payloads(model_field, requests, words, concurrency, ours, OUTPUT_TOKENS)
            got = load(port, payloads, concurrency, timeout_s=time_left(600))
            results[f"c{concurrency}"] = got
            log(f"{name}: c{concurrency} {json.dumps(got)}")
    return results


# -- the run ------------------------------------------------------------------------------------------------
def main() -> int:
    # SIGTERM (timeout, kill) as an exit, so that the finally: blocks stop the servers this started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/lightweight_gpu")))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen2-0.5b-random"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and few requests: checks the flow")
    parser.add_argument(
        "--skip", default="", help="comma list of phases to skip: equiv,timing,hf,tserve,ours,fused"
    )
    parser.add_argument(
        "--variants", action="store_true", help="also at c64: fast with --model-in-thread, and fused"
    )
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="skip phases that would start after this"
    )
    args = parser.parse_args()
    DEADLINE[0] = T0 + args.budget_s + 40.0
    skip = set(filter(None, args.skip.split(",")))
    if not args.variants:
        skip.update({"fused", "ours_thread"})
    args.out.mkdir(parents=True, exist_ok=True)
    shape = SMOKE if args.smoke else QWEN2_05B
    new_tokens = 16 if args.smoke else OUTPUT_TOKENS
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}

    import torch
    import transformers

    results["env"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
    }
    log(f"env {results['env']}")

    def phase(name: str, fn: Any, *fn_args: Any) -> Any:
        if name.split(":")[0] in skip:
            return None
        if time.monotonic() - T0 > args.budget_s:
            log(f"{name}: skipped (over the time budget)")
            results.setdefault("skipped", []).append(name)
            return None
        log(f"{name}: start")
        try:
            value = fn(*fn_args)
        except Exception as exc:  # one failed phase must not cost the others: report it and go on
            log(f"{name}: FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc()
            results.setdefault("failures", {})[name] = f"{type(exc).__name__}: {exc}"
            return None
        finally:
            # The phase's models are garbage now: give their GPU memory back before the next one.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results[name] = value
        log(f"{name}: {json.dumps(value)}")
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        return value

    phase("build", lambda: (build_model(args.model_dir, shape, args.device), str(args.model_dir))[1])
    phase("equiv:float32", equivalence, args.model_dir, args.device, "float32", 8 if args.smoke else 48)
    phase("equiv:bfloat16", equivalence, args.model_dir, args.device, "bfloat16", 8 if args.smoke else 48)
    phase("timing", backend_timings, args.model_dir, args.device, 64, 5 if args.smoke else 50)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # transformers serve lists the hub cache on some routes; a fresh machine has none.
    (Path.home() / ".cache" / "huggingface" / "hub").mkdir(parents=True, exist_ok=True)
    words: Callable[[list[int]], str] = lambda ids: ""  # noqa: E731
    with contextlib.suppress(Exception):
        words = transformers.AutoTokenizer.from_pretrained(args.model_dir).decode
    c1_ours, c64_ours = (2, 16) if args.smoke else (8, 256)
    c1_theirs, c64_theirs = (2, 16) if args.smoke else (2, 128)
    model_dir = str(args.model_dir)
    tserve = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir, "--continuous-batching",
        "--host", "127.0.0.1", "--port", "18801", "--dtype", "bfloat16", "--device", args.device,
    ]  # fmt: skip
    if args.smoke:
        # On a CPU, continuous batching sizes its paged cache from the host's free memory: keep it small.
        tserve += ["--cb-num-blocks", "64", "--cb-max-batch-tokens", "512"]

    def worker_argv(impl: str, port: int, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "llmstack.workers.lightweight", "--model", model_dir,
            "--served-model-name", SERVED_NAME, "--port", str(port), "--device", args.device,
            "--dtype", "bfloat16", "--model-impl", impl, "--max-batch-size", "64",
            "--max-model-len", str(PROMPT_TOKENS + OUTPUT_TOKENS), "--max-waiting-requests", "1024", *extra,
        ]  # fmt: skip

    phase(
        "ours",
        serve_and_load,
        "ours", worker_argv("fast", 18802), 18802, args.out, env, SERVED_NAME, words, True,
        [(1, c1_ours), (64, c64_ours)], 300.0,
    )  # fmt: skip
    phase("hf:b64", hf_generate, args.model_dir, args.device, 64, new_tokens)
    phase("hf:b1", hf_generate, args.model_dir, args.device, 1, new_tokens)
    phase(
        "tserve",
        serve_and_load,
        "tserve", tserve, 18801, args.out, env, model_dir, words, False,
        [(1, c1_theirs), (64, c64_theirs)], 300.0,
    )  # fmt: skip
    phase(
        "ours_thread",
        serve_and_load,
        "ours_thread", worker_argv("fast", 18804, "--model-in-thread"), 18804, args.out, env, SERVED_NAME,
        words, True,
        [(64, c64_ours)], 300.0,
    )  # fmt: skip
    phase(
        "fused",
        serve_and_load,
        "fused", worker_argv("fused", 18803), 18803, args.out, env, SERVED_NAME, words, True,
        [(64, c64_theirs)], 300.0,
    )  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    def tok_s(*keys: str) -> float | None:
        node: Any = results
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return float(node)

    hf = (tok_s("hf:b1", "tok_s"), tok_s("hf:b64", "tok_s"))
    tserve = (tok_s("tserve", "c1", "tok_s"), tok_s("tserve", "c64", "tok_s"))
    ours1, ours64 = tok_s("ours", "c1", "tok_s"), tok_s("ours", "c64", "tok_s")
    rows = [
        ("HF generate, static batch", *hf),
        ("transformers serve --continuous-batching", *tserve),
        ("llmstack lightweight, model_impl=fast", ours1, ours64),
        ("  the same, model loop in the HTTP process", None, tok_s("ours_thread", "c64", "tok_s")),
        ("llmstack lightweight, model_impl=fused", None, tok_s("fused", "c64", "tok_s")),
    ]
    print()
    env = results["env"]
    print(f"GPU: {env['gpu']}  torch {env['torch']}  transformers {env['transformers']}")
    for name in ("equiv:float32", "equiv:bfloat16"):
        e = results.get(name)
        if e:
            same = e["agreeing_prefix"]
            print(f"{name}: tokens equal to HF generate: {e['equal']} (agreeing prefix per sequence {same})")
    timing = results.get("timing")
    if timing:
        print(
            "backend alone, ms per decode step: "
            + ", ".join(f"{k.removeprefix('decode_').removesuffix('_ms')} {v}" for k, v in timing.items()
                        if k.startswith("decode_") and k.endswith("_ms"))
        )  # fmt: skip
    print(f"{'output tokens/s (128 in, 256 out)':44} {'c1 / batch 1':>14} {'c64 / batch 64':>15}")
    for name, c1, c64 in rows:
        fmt = lambda v: f"{v:,.0f}" if v is not None else "-"  # noqa: E731
        print(f"{name:44} {fmt(c1):>14} {fmt(c64):>15}")
    for label, base1, base64 in (
        ("HF generate", *hf),
        ("transformers serve", rows[1][1], rows[1][2]),
    ):
        r1 = f"{ours1 / base1:.1f}x" if ours1 and base1 else "-"
        r64 = f"{ours64 / base64:.1f}x" if ours64 and base64 else "-"
        print(f"{'fast vs ' + label:44} {r1:>14} {r64:>15}")
    verdict64 = all(
        ours64 is not None and base is not None and ours64 >= 10 * base for base in (rows[0][2], rows[1][2])
    )
    print(f"targets: c64 >= 10x both: {verdict64}; c1 >= 150 tok/s: {bool(ours1 and ours1 >= 150)}")
    if results.get("failures"):
        print(f"FAILED phases: {results['failures']}")


if __name__ == "__main__":
    sys.exit(main())
