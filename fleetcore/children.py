"""Child processes that do not outlive the process that started them.

``certfleet up`` and ``demo`` stop their services by PID, in order, when they end; but a
SIGKILLed ``up`` runs no code, and its registry, brokers and nats-server used to live on,
orphaned, holding their ports. Linux's ``PR_SET_PDEATHSIG`` has the kernel send each child a
signal when its parent dies. Elsewhere nothing changes (the PID-based stop still applies).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["exit_with_parent"]

_PR_SET_PDEATHSIG = 1

# Looked up once in the parent: the child, between fork and exec, only calls it.
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        _prctl = None


def exit_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when this process
    dies (the child's own handler then stops it cleanly). None where the kernel cannot."""
    if _prctl is None:
        return None
    prctl = _prctl
    parent = os.getpid()

    def arrange() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), sig)

    return arrange
