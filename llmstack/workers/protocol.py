"""What the launcher and a worker agree on: the worker's command line, and the environment it reads.

The launcher renders `WorkerOptions.to_argv()`; the worker parses the same flags with `WorkerOptions.parse()`.
Both sides import this module only, so a flag cannot be spelled two ways. Standard library only: it is
imported by interpreters that have neither Hydra (the ipex-llm venv) nor torch (the launcher).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LIGHTWEIGHT_MODULE = "llmstack.workers.lightweight"
# Every rank of a pipeline-parallel worker runs this module (under torchrun); rank 0 also serves HTTP.
PIPELINE_MODULE = "llmstack.workers.pipeline"
# torchrun itself, with a report of the first rank that failed (its number and its log's last lines).
PIPELINE_TORCHRUN_MODULE = "llmstack.workers.pipeline.torchrun"
# The API key travels in the environment, so it does not show in `ps`.
API_KEY_ENV = "LLMSTACK_API_KEY"
# llmstack's cache (models, compiled kernels, composed configs); see `cache_dir`.
CACHE_ENV = "LLMSTACK_CACHE"

BACKENDS = ("transformers", "ipex_llm")
# Where each backend runs. ipex-llm's low-bit kernels exist for Intel GPUs and (some formats) CPUs.
BACKEND_DEVICES = {"transformers": ("cpu", "cuda", "xpu"), "ipex_llm": ("cpu", "xpu")}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# auto: on cuda `fast` where the architecture is supported; else `fused` where it is, else `generic`.
# fused: llmstack's own decoder over the checkpoint's weights (Llama, Mistral, Qwen2): static per-slot KV
#   cache, per-sequence positions, fused QKV and gate/up projections.
# generic: the model's own forward() with a batched, left-padded KV cache managed by the worker; any causal
#   LM, and the only choice for ipex_llm (its low-bit layers replace the model's modules).
# fast: `backends.fast_llama` (Llama, Mistral, Qwen2): batched prefill, and on CUDA the decode step as
#   CUDA-graph replays over batch-size and attention-width buckets; elsewhere the same arithmetic eagerly.
MODEL_IMPLS = ("auto", "fused", "generic", "fast")
FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class WorkerOptions:
    """Everything a lightweight worker needs to start. Defaults are the worker's own."""

    model: str
    served_model_name: str
    tokenizer: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "transformers"
    device: str = "cpu"
    # Torch dtype of the unquantized weights and activations; auto = the checkpoint's.
    dtype: str = "auto"
    # ipex-llm's load_in_low_bit value (backend=ipex_llm only).
    low_bit: str | None = None
    model_impl: str = "auto"
    # Sequences decoded together (KV slots); more wait in a queue of max_waiting_requests, then 503.
    max_batch_size: int = 16
    max_waiting_requests: int = 256
    # Prompt + output tokens per sequence; None: the model's max_position_embeddings.
    max_model_len: int | None = None
    trust_remote_code: bool = False
    # torch.set_num_threads; None: on cpu, all cores but one (left to HTTP); elsewhere torch's default.
    torch_threads: int | None = None
    # Run the scheduler and the model in a child process (no GIL shared with HTTP); False: a thread.
    model_process: bool = True
    log_level: str = "info"
    # What one request may ask for. Stop strings: vLLM's count (VLLM_MAX_STOP_STRINGS), and a length of
    # ours (vLLM has none; each character is checked at every token). Bodies and prompts are bounded
    # before they are parsed or tokenized, so that one request cannot hold the event loop.
    max_stop_strings: int = 4
    max_stop_string_chars: int = 1024
    max_request_bytes: int = 16 * 1024 * 1024
    # None: 64 characters per token of context (a token is rarely longer; the exact limit is max_model_len).
    max_prompt_chars: int | None = None
    # Run chat templates that requests bring (vLLM's --trust-request-chat-template): arbitrary Jinja code.
    trust_request_chat_template: bool = False
    # /health answers 503 when requests are open and the model loop has not moved for this long.
    stall_timeout_s: float = 60.0

    def to_argv(self) -> list[str]:
        argv = ["--model", self.model, "--served-model-name", self.served_model_name]
        if self.tokenizer:
            argv += ["--tokenizer", self.tokenizer]
        argv += ["--host", self.host, "--port", str(self.port)]
        argv += ["--backend", self.backend, "--device", self.device, "--dtype", self.dtype]
        if self.low_bit:
            argv += ["--low-bit", self.low_bit]
        argv += ["--model-impl", self.model_impl]
        argv += ["--max-batch-size", str(self.max_batch_size)]
        argv += ["--max-waiting-requests", str(self.max_waiting_requests)]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.trust_remote_code:
            argv.append("--trust-remote-code")
        if self.torch_threads is not None:
            argv += ["--torch-threads", str(self.torch_threads)]
        if not self.model_process:
            argv.append("--model-in-thread")
        argv += ["--log-level", self.log_level]
        # The request limits only where they differ from the worker's defaults: shorter commands.
        for name, flag in _LIMIT_FLAGS.items():
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                argv += [flag] if value is True else [flag, str(value)]
        return argv

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None) -> WorkerOptions:
        args = cls._parser().parse_args(argv)
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def _parser(cls) -> argparse.ArgumentParser:
        return _parser()


# Collective backends of a pipeline: gloo (cpu), nccl (cuda), xccl (xpu, torch >= 2.8 XPU builds), ccl (xpu
# through oneccl_bindings_for_pytorch, with ipex-llm). The control messages always travel over gloo.
DIST_BACKENDS = ("gloo", "nccl", "xccl", "ccl")
# How decoder layers are split across ranks: by count, or by parameter bytes (embedding and LM head counted).
PARTITIONS = ("layers", "bytes")


@dataclass(frozen=True)
class PipelineOptions(WorkerOptions):
    """A pipeline-parallel worker: the lightweight worker's options (`max_batch_size` is per micro-batch:
    ipex-llm's `--max-num-seqs`, "maximum batch size on a single card") and how the pipeline is cut."""

    # Ranks (stages); torchrun's --nproc-per-node times its nodes. The worker checks it against WORLD_SIZE.
    pipeline_parallel_size: int = 2
    # Micro-batches in flight; 0 = one per stage (ipex-llm: up to world_size batches).
    micro_batches: int = 0
    # Prompts prefilled in one step of a micro-batch; 0 = every admitted one (ipex-llm --max-prefilled-seqs).
    max_prefilled_seqs: int = 0
    # Prompt tokens one step of a micro-batch carries at most (longer prompts are fed over several steps, so
    # that steps cost about the same at every stage); 0 = whole prompts.
    prefill_chunk: int = 0
    dist_backend: str = "gloo"
    partition: str = "layers"
    # Explicit decoder layers per stage, e.g. "3,2,2" (overrides `partition`); "" = computed.
    layer_split: str = ""
    # Seconds a rank waits in one transfer before the pipeline is declared hung (idle ranks are kept alive
    # by rank 0's heartbeat, so this bounds a step, not an idle period).
    collective_timeout_s: float = 300.0

    def to_argv(self) -> list[str]:
        argv = super().to_argv()
        argv += ["--pipeline-parallel-size", str(self.pipeline_parallel_size)]
        argv += ["--micro-batches", str(self.micro_batches)]
        argv += ["--max-prefilled-seqs", str(self.max_prefilled_seqs)]
        if self.prefill_chunk:
            argv += ["--prefill-chunk", str(self.prefill_chunk)]
        argv += ["--dist-backend", self.dist_backend, "--partition", self.partition]
        if self.layer_split:
            argv += ["--layer-split", self.layer_split]
        argv += ["--collective-timeout-s", f"{self.collective_timeout_s:g}"]
        return argv

    @classmethod
    def _parser(cls) -> argparse.ArgumentParser:
        p = _parser(prog=f"python -m {PIPELINE_MODULE}")
        p.add_argument("--pipeline-parallel-size", dest="pipeline_parallel_size", type=_positive, default=2)
        p.add_argument("--micro-batches", dest="micro_batches", type=_non_negative, default=0)
        p.add_argument("--max-prefilled-seqs", dest="max_prefilled_seqs", type=_non_negative, default=0)
        p.add_argument("--prefill-chunk", dest="prefill_chunk", type=_non_negative, default=0)
        p.add_argument("--dist-backend", dest="dist_backend", choices=DIST_BACKENDS, default="gloo")
        p.add_argument("--partition", choices=PARTITIONS, default="layers")
        p.add_argument("--layer-split", dest="layer_split", default="")
        p.add_argument("--collective-timeout-s", dest="collective_timeout_s", type=float, default=300.0)
        return p


def parse_layer_split(text: str) -> list[int]:
    """ "3,2,2" -> [3, 2, 2]; ValueError unless every part is a positive integer."""
    parts = [int(part) for part in text.split(",")]
    if any(part < 1 for part in parts):
        raise ValueError(f"every stage needs at least one layer: {text!r}")
    return parts


def _parser(prog: str = f"python -m {LIGHTWEIGHT_MODULE}") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="llmstack's lightweight OpenAI-compatible server with continuous batching "
        f"(API key from ${API_KEY_ENV}).",
    )
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--served-model-name", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=BACKENDS, default="transformers")
    p.add_argument("--device", choices=("cpu", "cuda", "xpu"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--low-bit", dest="low_bit", default=None, help="ipex-llm load_in_low_bit format")
    p.add_argument("--model-impl", dest="model_impl", choices=MODEL_IMPLS, default="auto")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=_positive, default=16)
    p.add_argument("--max-waiting-requests", dest="max_waiting_requests", type=_non_negative, default=256)
    p.add_argument("--max-model-len", dest="max_model_len", type=_positive, default=None)
    p.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true")
    p.add_argument("--torch-threads", dest="torch_threads", type=_positive, default=None)
    p.add_argument(
        "--model-in-thread",
        dest="model_process",
        action="store_false",
        help="run the scheduler and model in a thread of the server process, not a child process",
    )
    p.add_argument(
        "--log-level", dest="log_level", default="info", choices=("debug", "info", "warning", "error")
    )
    p.add_argument("--max-stop-strings", dest="max_stop_strings", type=_non_negative, default=4)
    p.add_argument("--max-stop-string-chars", dest="max_stop_string_chars", type=_positive, default=1024)
    p.add_argument("--max-request-bytes", dest="max_request_bytes", type=_positive, default=16 * 1024 * 1024)
    p.add_argument("--max-prompt-chars", dest="max_prompt_chars", type=_positive, default=None)
    p.add_argument("--trust-request-chat-template", dest="trust_request_chat_template", action="store_true")
    p.add_argument("--stall-timeout-s", dest="stall_timeout_s", type=float, default=60.0)
    return p


_LIMIT_FLAGS = {
    "max_stop_strings": "--max-stop-strings",
    "max_stop_string_chars": "--max-stop-string-chars",
    "max_request_bytes": "--max-request-bytes",
    "max_prompt_chars": "--max-prompt-chars",
    "trust_request_chat_template": "--trust-request-chat-template",
    "stall_timeout_s": "--stall-timeout-s",
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(WorkerOptions)}


def cache_dir() -> Path:
    """`$LLMSTACK_CACHE`, else `$XDG_CACHE_HOME/llmstack`, else `~/.cache/llmstack`."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llmstack"
