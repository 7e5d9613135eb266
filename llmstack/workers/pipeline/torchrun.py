"""torchrun, with a report of the rank that failed first.

    python -m llmstack.workers.pipeline.torchrun <exactly torchrun's arguments>

This is torch's own elastic launcher (`torch.distributed.run`: its argument parser, its agent, its
rendezvous; nothing spawned here), called as a library so that a failure can be said plainly: when a rank
dies, torchrun stops the others and raises ChildFailedError; this prints which rank failed first, how
(exit status or signal), and the last lines of that rank's own log (`--log-dir`, a temporary directory
when none is given), as the last lines of the output, which are what the launcher shows. A stop signal
(torchrun's agent turns SIGTERM/SIGINT into SignalException after stopping its ranks) exits 0.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

TAIL_LINES = 15


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    own_dir = args.log_dir is None
    if own_dir:
        args.log_dir = tempfile.mkdtemp(prefix="llmstack-torchrun-")
    try:
        run(args)
        return 0
    except SignalException as exc:
        print(f"torchrun stopped its ranks on signal {exc.sigval.name}", flush=True)
        return 0
    except ChildFailedError as exc:
        print(failure_report(exc, Path(args.log_dir)), flush=True)
        return 1
    finally:
        if own_dir:
            shutil.rmtree(args.log_dir, ignore_errors=True)


def failure_report(exc: object, log_dir: Path) -> str:
    """Which rank failed first, how, and its log's last lines."""
    rank, failure = exc.get_first_failure()  # type: ignore[attr-defined]
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
    lines = [f"pipeline rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed first: {how}"]
    tail = rank_log_tail(log_dir, failure.local_rank)
    if tail:
        lines.append(f"last lines of rank {rank}'s log:")
        lines += [f"  [rank {rank}] {line}" for line in tail]
    else:
        lines.append(f"rank {rank} wrote nothing to its log")
    return "\n".join(lines)


def rank_log_tail(log_dir: Path, local_rank: int, count: int = TAIL_LINES) -> list[str]:
    """The last lines of a rank's stdout and stderr logs (torchrun: <dir>/<run>/attempt_<n>/<rank>/)."""
    lines: list[str] = []
    for path in sorted(log_dir.glob(f"*/attempt_*/{local_rank}/std*.log")):
        try:
            lines += path.read_text(errors="replace").splitlines()
        except OSError:
            continue
    return [line for line in lines if line.strip()][-count:]


if __name__ == "__main__":
    sys.exit(main())
