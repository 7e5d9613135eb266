"""Ask Linux to signal this process when its parent dies (prctl PR_SET_PDEATHSIG), even by SIGKILL.

A leaf of stdlib only: the supervisor uses it for the engines it starts, and the lightweight worker for its
model process; workers are separate programs that import nothing of the launcher, so it imports nothing of
llmstack.
"""

from __future__ import annotations

import contextlib
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Have `sig` delivered to this process when its parent thread exits; a no-op off Linux."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
