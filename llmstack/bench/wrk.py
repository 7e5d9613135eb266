"""wrk, the HTTP load tool of the seed's RPS test: its Lua payload script, its command, and its report.

`payload_lua` writes what the seed's payload-1024.lua did, for any body and model name: a POST with a JSON
body, plus a `response` callback that logs the first few non-2xx responses of each thread (a wrong model
name answers 404, which wrk's own report only counts). The API key is read from the environment at run
time, so the script can be kept with the results without holding a secret.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["WrkReport", "parse_wrk_output", "payload_lua", "run_wrk", "wrk_command"]

logger = logging.getLogger(__name__)

API_KEY_ENV = "LLMSTACK_WRK_API_KEY"
ERROR_LOG = "wrk-errors.log"

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def payload_lua(body: Mapping[str, Any], *, errors_per_thread: int = 10) -> str:
    """A wrk script sending `body` (as JSON) in every POST."""
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1  # a Lua long bracket the text does not close
    eq = "=" * level
    return f"""-- Written by llmstack: the rps benchmark's request, for wrk.
--   wrk -t<threads> -c<connections> -d<seconds>s -s payload.lua <base_url>/v1/completions --latency
-- Set {API_KEY_ENV} when the server wants an API key.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("{API_KEY_ENV}")
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = [{eq}[{text}]{eq}]

-- Failures show in wrk's report only as a count: keep the first few of each thread, with their body.
local logged = 0
function response(status, headers, body)
  if (status < 200 or status > 299) and logged < {errors_per_thread} then
    logged = logged + 1
    local log = io.open("{ERROR_LOG}", "a")
    if log then
      log:write("status: " .. status .. "\\n" .. tostring(body) .. "\\n-----\\n")
      log:close()
    end
  end
end
"""


def wrk_command(
    url: str, script: str, *, threads: int, connections: int, duration_s: float, timeout_s: float
) -> list[str]:
    """wrk's command line; durations are whole seconds (at least one), as wrk reads them."""
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        f"{max(1, math.ceil(timeout_s))}s",
        "--latency",
        "-s",
        script,
        url,
    ]


@dataclass
class WrkReport:
    """What wrk printed, in seconds and counts. Latencies are per request, send to full response."""

    requests: int
    duration_s: float
    requests_per_s: float
    latency_mean_s: float | None = None
    latency_stdev_s: float | None = None
    latency_max_s: float | None = None
    # Percentile (50, 75, 90, 99) -> seconds, from --latency.
    latency_percentiles_s: dict[float, float] | None = None
    bytes_read: int | None = None
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum((self.socket_errors or {}).values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "duration_s": self.duration_s,
            "requests_per_s": self.requests_per_s,
            "latency_mean_s": self.latency_mean_s,
            "latency_stdev_s": self.latency_stdev_s,
            "latency_max_s": self.latency_max_s,
            "latency_percentiles_s": {f"p{p:g}": v for p, v in (self.latency_percentiles_s or {}).items()},
            "bytes_read": self.bytes_read,
            "non_2xx_3xx": self.non_2xx_3xx,
            "socket_errors": self.socket_errors or {},
            "errors": self.errors,
        }


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_S[match.group(2)]


def _size(text: str) -> int:
    match = re.fullmatch(r"([0-9.]+)([KMGT]?B?)", text)
    if match is None:
        raise ValueError(f"not a wrk size: {text!r}")
    return round(float(match.group(1)) * _SIZE[match.group(2)])


def parse_wrk_output(text: str) -> WrkReport:
    """Parse wrk's report (with --latency). Raises ValueError when the essential lines are missing."""
    done = re.search(r"^\s*(\d+) requests in ([0-9.]+\w+), ([0-9.]+\w*) read", text, re.M)
    rate = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if done is None or rate is None:
        raise ValueError("no 'N requests in T' and 'Requests/sec' lines in wrk's output")
    report = WrkReport(
        requests=int(done.group(1)),
        duration_s=_seconds(done.group(2)),
        requests_per_s=float(rate.group(1)),
        bytes_read=_size(done.group(3)),
    )
    latency = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+%", text, re.M)
    if latency is not None:
        report.latency_mean_s = _seconds(latency.group(1))
        report.latency_stdev_s = _seconds(latency.group(2))
        report.latency_max_s = _seconds(latency.group(3))
    distribution = text.split("Latency Distribution", 1)
    if len(distribution) == 2:
        report.latency_percentiles_s = {
            float(p): _seconds(v) for p, v in re.findall(r"^\s+([0-9.]+)%\s+(\S+)\s*$", distribution[1], re.M)
        }
    non_2xx = re.search(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", text, re.M)
    if non_2xx is not None:
        report.non_2xx_3xx = int(non_2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sockets is not None:
        names = ("connect", "read", "write", "timeout")
        report.socket_errors = {n: int(v) for n, v in zip(names, sockets.groups(), strict=True)}
    return report


def available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    command: list[str],
    *,
    cwd: Path,
    api_key: str | None,
    timeout_s: float,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[str, WrkReport | None, str | None]:
    """Run wrk to completion: (its output, the parsed report or None, an error or None).

    wrk is one process with threads; it is killed on a timeout, on any exception here, and as soon as
    `should_stop()` (a stop signal) turns true.
    """
    import os
    import time

    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    logger.info("running %s", " ".join(command))
    try:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except OSError as exc:
        return "", None, f"wrk could not start: {exc}"
    deadline = time.monotonic() + timeout_s
    with proc:
        try:
            while True:
                try:
                    stdout, stderr = proc.communicate(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    if should_stop is not None and should_stop():
                        proc.kill()
                        stdout, stderr = proc.communicate()
                        return stdout, None, "wrk was stopped"
                    if time.monotonic() > deadline:
                        proc.kill()
                        stdout, _ = proc.communicate()
                        return stdout or "", None, f"wrk did not finish within {timeout_s:.0f} s"
        except BaseException:
            proc.kill()
            raise
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    output = done.stdout + (done.stderr if done.stderr else "")
    if done.returncode != 0:
        return output, None, f"wrk exited with status {done.returncode}: {done.stderr.strip()[:300]}"
    try:
        return output, parse_wrk_output(done.stdout), None
    except ValueError as exc:
        return output, None, f"wrk's output could not be read: {exc}"
