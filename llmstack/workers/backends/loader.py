"""Loads the model and tokenizer a worker was started with, and picks its backend (`--model-impl`).

The tokenizer, the weights (transformers, or ipex-llm's low-bit model) and the backend that runs them;
`load` also sets torch's CPU threads and, on CPU, keeps freed memory in the heap (`heap.py`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from llmstack.workers.backends.base import Backend, BackendInfo
from llmstack.workers.protocol import WorkerOptions

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class BackendError(Exception):
    """The model cannot be served as asked (printed as one line, exit status 2)."""


@dataclass
class LoadedModel:
    backend: Backend
    tokenizer: Any
    # Token ids that end a sequence (generation_config's, the tokenizer's).
    eos_token_ids: list[int]
    max_model_len: int


def load(options: WorkerOptions) -> LoadedModel:
    import torch

    device = _device(options.device)
    threads = options.torch_threads
    if threads is None and device.type == "cpu":
        threads = default_cpu_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        from llmstack.workers.backends.heap import keep_freed_memory

        keep_freed_memory()
    started = time.perf_counter()
    tokenizer = load_tokenizer(options)
    if options.backend == "ipex_llm":
        model = _load_ipex_llm(options, device)
    else:
        model = _load_transformers(options, device)
    model.eval()
    cfg = model.config
    max_model_len = options.max_model_len or int(getattr(cfg, "max_position_embeddings", 0) or 2048)
    info = BackendInfo(
        backend=options.backend,
        model_impl="generic",
        device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        low_bit=options.low_bit,
        model_type=str(cfg.model_type),
        module_types=_module_types(model),
    )
    if options.backend == "ipex_llm":
        info.extra["qtypes"] = ipex_qtype_counts(model)
    backend = _make_backend(options, model, tokenizer, max_model_len, info)
    eos = _eos_token_ids(model, tokenizer)
    logger.info(
        "loaded %s in %.1f s: backend %s (%s%s), %s on %s, max_batch_size %d, max_model_len %d, "
        "KV cache %.1f MiB reserved, EOS ids %s",
        options.model,
        time.perf_counter() - started,
        options.backend,
        info.model_impl,
        f", attention {info.extra['attention']}" if "attention" in info.extra else "",
        info.dtype,
        info.device,
        options.max_batch_size,
        max_model_len,
        info.kv_cache_bytes / 2**20,
        eos,
    )
    return LoadedModel(backend, tokenizer, eos, max_model_len)


def _make_backend(
    options: WorkerOptions, model: Any, tokenizer: Any, max_model_len: int, info: BackendInfo
) -> Backend:
    from llmstack.workers.backends.generic import GenericBackend
    from llmstack.workers.backends.layers import unsupported_reason

    impl = options.model_impl
    if options.backend == "ipex_llm":
        if impl in ("fused", "fast"):
            raise BackendError(
                f"--model-impl {impl} runs unquantized transformers models; ipex_llm is generic"
            )
        impl = "generic"
    if impl == "auto":
        impl = auto_model_impl(options.device, model, max_model_len)
    if impl == "fast":
        from llmstack.workers.backends.fast_llama import FastLlamaBackend

        reason = unsupported_reason(model, max_model_len)
        if reason is not None:
            raise BackendError(f"--model-impl fast cannot run this model: {reason}")
        info.model_impl = "fast"
        return FastLlamaBackend(
            model, max_batch_size=options.max_batch_size, max_model_len=max_model_len, info=info
        )
    if impl in ("auto", "fused"):
        reason = unsupported_reason(model, max_model_len)
        if reason is None:
            from llmstack.workers.backends.fused import FusedDecoderBackend

            info.model_impl = "fused"
            return FusedDecoderBackend(
                model, max_batch_size=options.max_batch_size, max_model_len=max_model_len, info=info
            )
        if impl == "fused":
            raise BackendError(f"--model-impl fused cannot run this model: {reason}")
        logger.info("model_impl auto: generic forward (%s)", reason)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return GenericBackend(
        model,
        max_batch_size=options.max_batch_size,
        max_model_len=max_model_len,
        pad_token_id=int(pad),
        info=info,
    )


def auto_model_impl(device: str, model: Any, max_model_len: int) -> str:
    """What `model_impl=auto` runs: on CUDA the CUDA-graph decoder (`fast`) where the architecture allows it
    (measured on an H100: 18x HF generate at concurrency 64, where `fused` is launch-bound); elsewhere
    `fused` (on CPU with llmstack's C attention kernel); `auto` again means fused-or-generic below."""
    if device == "cuda":
        from llmstack.workers.backends.layers import unsupported_reason

        if unsupported_reason(model, max_model_len) is None:
            return "fast"
    return "auto"


def default_cpu_threads() -> int:
    """Every core this process may use but one, which is left to HTTP and tokenization (vLLM's CPU backend
    reserves one the same way). Intra-op threads that outnumber the free cores spin-wait for each other at
    every op: on a 2-core machine with a load generator beside it, 2 threads made a step ~10x slower."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def _device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise BackendError("device cuda: torch.cuda.is_available() is False in this interpreter")
    if name == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise BackendError("device xpu: torch.xpu.is_available() is False in this interpreter")
    return torch.device(name)


def _torch_dtype(options: WorkerOptions) -> Any:
    import torch

    if options.dtype != "auto":
        return getattr(torch, _DTYPES[options.dtype])
    return "auto"


def load_tokenizer(options: WorkerOptions) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        options.tokenizer or options.model, trust_remote_code=options.trust_remote_code
    )


def _load_transformers(options: WorkerOptions, device: Any) -> Any:
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = _torch_dtype(options)
    # transformers 5 renamed torch_dtype to dtype.
    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        options.model, trust_remote_code=options.trust_remote_code, **{dtype_kwarg: dtype}
    )
    return model.to(device)


def _load_ipex_llm(options: WorkerOptions, device: Any) -> Any:
    import torch

    try:
        from ipex_llm.transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise BackendError(f"backend ipex_llm: cannot import ipex_llm in this interpreter ({exc})") from exc
    if not options.low_bit:
        raise BackendError("backend ipex_llm needs --low-bit (e.g. sym_int4)")
    dtype = _torch_dtype(options)
    if dtype == "auto":
        # ipex-llm's lightweight serving runs float16 on Intel GPUs; its CPU kernels want float32 activations.
        dtype = torch.float16 if device.type == "xpu" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        options.model,
        load_in_low_bit=options.low_bit,
        torch_dtype=dtype,
        optimize_model=True,
        trust_remote_code=options.trust_remote_code,
        use_cache=True,
    )
    return model.to(device)


def _module_types(model: Any) -> dict[str, int]:
    from llmstack.workers.backends.generic import count_module_types

    return count_module_types(model)


def ipex_qtype_counts(root: Any, *, unquantized: bool = False) -> dict[str, int]:
    """How many of ipex-llm's low-bit layers under `root` hold each format, e.g. {"sym_int4": 11}; with
    `unquantized`, plain nn.Linear layers too, as "unquantized" (ipex-llm leaves some as they are)."""
    from ipex_llm.ggml.quantize import ggml_tensor_qtype
    from torch import nn

    names: dict[int, str] = {}
    for name, code in ggml_tensor_qtype.items():
        names.setdefault(code, name)  # fp8 and fp8_e5m2 share a code: keep the first spelling
    counts: dict[str, int] = {}
    for module in root.modules():
        qtype = getattr(module, "qtype", None)
        if isinstance(qtype, int):
            label = names.get(qtype, str(qtype))
        elif unquantized and type(module) is nn.Linear:
            label = "unquantized"
        else:
            continue
        counts[label] = counts.get(label, 0) + 1
    return counts


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    generation = getattr(model, "generation_config", None)
    configured = getattr(generation, "eos_token_id", None)
    if configured is None:
        configured = getattr(model.config, "eos_token_id", None)
    return merge_eos_ids(configured, tokenizer)


def merge_eos_ids(configured: int | list[int] | None, tokenizer: Any) -> list[int]:
    """The configured EOS id(s) (generation config, else model config), then the tokenizer's."""
    ids: list[int] = []
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids
