"""Bounded waits that never swallow a cancellation.

Python 3.11's ``asyncio.wait_for`` returns the awaited result when the waiting task is
cancelled in the same loop iteration as that result arrives, and the cancellation is lost
(fixed in 3.12, where ``wait_for`` is built on ``asyncio.timeout``). A renewer cancelled at
the end of a run just as its device's connection came up then waited, uncancelled, until its
certificate expired, and the run with it (issue 14's "expired before renewal" at the end of
the staggered storm). ``asyncio.timeout`` counts cancellations and re-raises ours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

__all__ = ["completes_within", "set_within"]


async def set_within(event: asyncio.Event, seconds: float) -> bool:
    """True once ``event`` is set (at once when it is), False after ``seconds``."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(seconds, 0.0)):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def completes_within(awaitable: Awaitable[object], seconds: float) -> bool:
    """True when ``awaitable`` (shield it to keep it running) completes within ``seconds``."""
    try:
        async with asyncio.timeout(max(seconds, 0.0)):
            await awaitable
    except TimeoutError:
        return False
    return True
