"""llmstack's own CPU kernels (plain C, built on first use with the system C compiler, called with ctypes).

Plain C rather than a torch extension: it compiles in well under a second (a torch extension needs the
torch headers and tens of seconds), and it needs nothing but a C compiler. The shared object is cached
under `<llmstack cache>/kernels/` (`protocol.cache_dir`), keyed by the source, the compiler and this CPU's
flags (it is built with -march=native); a lock file keeps parallel workers from building it twice.
Anything missing (no compiler, a failed build, another platform) makes `cache_attention()` return None and
the backend keeps torch's attention; `LLMSTACK_CPU_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmstack.workers.protocol import cache_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "LLMSTACK_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("csrc") / "attention.c"
# -march=native: the object is built and cached on the machine that runs it (AVX2 paths where it has them).
_CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11")


class CacheAttention:
    """Writes a step's new keys and values into the KV cache and attends causally from its new tokens.

    One call serves every sequence of a step: at prefill each sequence brings its prompt (start 0), at
    decode one token (start = the tokens it has cached). Rows are tokens, the sequences' tokens consecutive.
    """

    def __init__(self, function: Any) -> None:
        self._function = function
        self._scratch: Any = None

    def __call__(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        out: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        starts: torch.Tensor,
        counts: torch.Tensor,
        scale: float,
    ) -> None:
        """q, out: [tokens, heads, dim]; k_new, v_new: [tokens, kv_heads, dim] (rows may be strided, heads
        and dim contiguous); caches: [slots, kv_heads, max_len, dim] with dim contiguous; slots, starts,
        counts: int64 [sequences], contiguous. All float32 on the CPU."""
        import torch

        kv_heads, max_len, dim = k_cache.shape[1:]
        group = q.shape[1] // kv_heads
        for t in (q, k_new, v_new, out):
            if t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != dim:
                raise ValueError("attention rows need float32 heads and dims contiguous")
        if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
            raise ValueError("attention needs k and v caches of one layout with dim contiguous")
        if self._scratch is None or self._scratch.numel() < group * max_len:
            self._scratch = torch.empty(group * max_len, dtype=torch.float32)
        s_slot, s_head, s_pos, _ = k_cache.stride()
        status = self._function(
            q.data_ptr(), q.stride(0), k_new.data_ptr(), k_new.stride(0), v_new.data_ptr(), v_new.stride(0),
            out.data_ptr(), out.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), s_slot, s_head, s_pos,
            slots.data_ptr(), starts.data_ptr(), counts.data_ptr(), slots.shape[0], kv_heads, group, dim,
            scale, self._scratch.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise ValueError("attention: every sequence needs a positive count and a non-negative start")


def cache_attention() -> CacheAttention | None:
    """The C attention kernel, or None where it is unavailable (see the module's docstring)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("CPU kernels off (%s=0): torch's attention", DISABLE_ENV)
        return None
    if not sys.platform.startswith("linux"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: torch's attention")
        return None
    library = _library(compiler)
    if library is None:
        return None
    function = library.llmstack_attention_f32
    function.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [
        ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64,
        ctypes.c_float, ptr,
    ]  # fmt: skip
    return CacheAttention(function)


@functools.cache
def _library(compiler: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("building the CPU attention kernel failed (%s): torch's attention", exc)
        return None


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    key = hashlib.sha256(source + version + " ".join(_CFLAGS).encode() + _cpu_flags()).hexdigest()[:16]
    directory = cache_dir() / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"attention-{key}.so"
    if target.exists():
        return target
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            result = subprocess.run(
                [compiler, *_CFLAGS, "-o", str(partial), str(_SOURCE), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode != 0:
                partial.unlink(missing_ok=True)
                raise OSError(f"{compiler} exited {result.returncode}: {result.stderr.strip()[-500:]}")
            partial.replace(target)
            logger.info("built %s", target)
    return target


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return b""
