"""wrk for the rps phase: the payload script runs in real wrk, its command, and its report parsed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmstack.bench.wrk import (
    API_KEY_ENV,
    ERROR_LOG,
    WrkReport,
    parse_wrk_output,
    payload_lua,
    run_wrk,
    wrk_command,
)
from llmstack.phases.rps import side_by_side
from tests.bench_instrument import instrument

pytestmark = pytest.mark.timeout(120)

# Real output of wrk 4.1.0 against vLLM on CPU (the rps phase, tiny model).
WRK_OUTPUT = """\
Running 4s test @ http://127.0.0.1:50995/v1/completions
  2 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   176.31ms   68.63ms 393.26ms   87.50%
    Req/Sec     6.66      3.20    12.00     45.45%
  Latency Distribution
     50%  143.77ms
     75%  209.65ms
     90%  289.09ms
     99%  393.26ms
  46 requests in 4.12s, 33.03KB read
Requests/sec:     11.16
Transfer/sec:      8.02KB
"""

# The same shape with every unit and both error lines wrk can print.
WRK_OUTPUT_ERRORS = """\
Running 1m test @ http://127.0.0.1:8000/v1/completions
  12 threads and 12 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.50s   800.00us    1.02m    66.00%
    Req/Sec     0.00      0.00     1.00     100.00%
  Latency Distribution
     50%    1.20s
     75%    2.00s
     90%  950.50ms
     99%    1.02m
  720 requests in 1.00m, 1.50MB read
  Socket errors: connect 0, read 2, write 0, timeout 5
  Non-2xx or 3xx responses: 7
Requests/sec:     12.00
Transfer/sec:     25.60KB
"""


def test_parse_real_wrk_output() -> None:
    report = parse_wrk_output(WRK_OUTPUT)
    assert (report.requests, report.duration_s, report.requests_per_s) == (46, 4.12, 11.16)
    assert report.latency_mean_s == pytest.approx(0.17631)
    assert report.latency_stdev_s == pytest.approx(0.06863)
    assert report.latency_max_s == pytest.approx(0.39326)
    assert report.latency_percentiles_s == pytest.approx({50.0: 0.14377, 75.0: 0.20965, 90.0: 0.28909,
                                                          99.0: 0.39326})  # fmt: skip
    assert report.bytes_read == round(33.03 * 1024)
    assert report.errors == 0 and report.socket_errors is None


def test_parse_units_and_errors() -> None:
    report = parse_wrk_output(WRK_OUTPUT_ERRORS)
    assert report.duration_s == 60.0 and report.requests == 720
    assert report.latency_mean_s == 1.5 and report.latency_stdev_s == pytest.approx(0.0008)
    assert report.latency_max_s == pytest.approx(61.2)
    assert report.latency_percentiles_s == pytest.approx({50.0: 1.2, 75.0: 2.0, 90.0: 0.9505, 99.0: 61.2})
    assert report.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 5}
    assert report.non_2xx_3xx == 7 and report.errors == 14
    assert report.bytes_read == round(1.5 * 1024**2)
    assert report.to_dict()["latency_percentiles_s"] == {"p50": 1.2, "p75": 2.0, "p90": 0.9505, "p99": 61.2}


def test_parse_refuses_output_without_a_summary() -> None:
    with pytest.raises(ValueError, match="Requests/sec"):
        parse_wrk_output("unable to connect to 127.0.0.1:9 Connection refused\n")


def test_command_matches_the_seed_form() -> None:
    assert wrk_command("http://h:8000/v1/completions", "payload.lua", threads=12, connections=12,
                       duration_s=900, timeout_s=60) == [
        "wrk", "-t12", "-c12", "-d900s", "--timeout", "60s", "--latency", "-s", "payload.lua",
        "http://h:8000/v1/completions",
    ]  # fmt: skip
    assert wrk_command("u", "p", threads=1, connections=1, duration_s=0.2, timeout_s=0.5)[3:6] == [
        "-d1s", "--timeout", "1s",
    ]  # fmt: skip


def test_payload_lua_survives_lua_long_bracket_text() -> None:
    body = {"model": "m", "prompt": "a ]] b ]=] c", "max_tokens": 8}
    script = payload_lua(body)
    assert "wrk.body = [==[" in script and script.count("]==]") == 1
    start = script.index("[==[") + 4
    assert json.loads(script[start : script.index("]==]")]) == body


needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)


@needs_wrk
def test_real_wrk_sends_exactly_our_body_and_key(tmp_path: Path) -> None:
    body = {"model": "served-name", "prompt": "Once upon a time ]] é", "max_tokens": 4, "stream": False}
    (tmp_path / "payload.lua").write_text(payload_lua(body))
    with instrument(delay_s=0.01) as server:
        command = wrk_command(server.url + "/v1/completions", "payload.lua", threads=1, connections=2,
                              duration_s=1, timeout_s=5)  # fmt: skip
        output, report, error = run_wrk(command, cwd=tmp_path, api_key="sk-test", timeout_s=60)
    assert error is None, output
    assert report is not None and report.requests > 10 and report.errors == 0
    assert report.latency_percentiles_s is not None and set(report.latency_percentiles_s) == {50, 75, 90, 99}
    assert len(server.bodies) >= report.requests
    assert all(json.loads(b) == body for b in server.bodies)
    assert {h["authorization"] for h in server.headers} == {"Bearer sk-test"}
    assert {h["content-type"] for h in server.headers} == {"application/json"}
    assert not (tmp_path / ERROR_LOG).exists()


@needs_wrk
def test_real_wrk_logs_failures_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "leaked-from-the-caller")
    (tmp_path / "payload.lua").write_text(payload_lua({"model": "nope", "prompt": "x"}))
    with instrument(status=404) as server:
        command = wrk_command(server.url + "/v1/completions", "payload.lua", threads=1, connections=1,
                              duration_s=1, timeout_s=5)  # fmt: skip
        _, report, error = run_wrk(command, cwd=tmp_path, api_key=None, timeout_s=60)
    assert error is None and report is not None
    assert report.non_2xx_3xx == report.requests > 0
    assert all("authorization" not in h for h in server.headers)
    logged = (tmp_path / ERROR_LOG).read_text()
    assert logged.startswith("status: 404") and "does not exist" in logged
    assert logged.count("-----") == 10  # the first ten failures of the thread, not all of them


def test_run_wrk_reports_a_failed_start(tmp_path: Path) -> None:
    _, report, error = run_wrk(["/nonexistent/wrk"], cwd=tmp_path, api_key=None, timeout_s=5)
    assert report is None and error is not None and "could not start" in error


def test_side_by_side_puts_both_clients_in_columns() -> None:
    summary = {"completed": 40, "failed": 1, "request_throughput": 9.5, "mean_e2el_ms": 180.0,
               "std_e2el_ms": 60.0, "p50_e2el_ms": 150.0, "p99_e2el_ms": 390.0,
               "output_throughput": 150.0}  # fmt: skip
    rps = {"requests_per_s_wrk_style": 10.0, "max_e2el_ms": 400.0}
    table = side_by_side(summary, rps, parse_wrk_output(WRK_OUTPUT), [50, 99])
    lines = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()[1:]}
    assert lines["completed requests"][-2:] == ["40", "46"]
    assert lines["requests/s (done in duration / duration)"][-2:] == ["10.00", "11.16"]
    assert lines["latency p99 (ms)"][-2:] == ["390.00", "393.26"]
    assert lines["latency max (ms)"][-2:] == ["400.00", "393.26"]
    alone = side_by_side(summary, rps, None, [50])
    assert "wrk (not run)" in alone.splitlines()[0]
    assert isinstance(WrkReport(1, 1.0, 1.0).to_dict(), dict)
