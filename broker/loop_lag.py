"""How late the broker's event loop runs a timer: the longest a connection waits for it.

Every :data:`TICK_S` a timer is due; the time it fires after that is the lag, observed
into ``certfleet_broker_loop_lag_seconds``. A lag is the loop busy with one piece of work
(a revocation batch, a TLS handshake step, a merge's hand-over) or the process waiting for
a core or for the GIL; either way every connection of the node waited as long. Alert on
its upper buckets; the benchmarks read it to tell the broker's own stalls from what a
client on a loaded machine sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

__all__ = ["LAG_BUCKETS", "TICK_S", "watch_loop_lag"]

#: How often the timer is due.
TICK_S: Final = 0.01
#: The histogram's buckets (seconds): 20 ms is the revocation work's budget (issue 23).
LAG_BUCKETS: Final = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


async def watch_loop_lag(observe: Callable[[float], None], tick_s: float = TICK_S) -> None:
    """Observe the loop's lag every ``tick_s`` until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick_s
        await asyncio.sleep(tick_s)
        observe(max(0.0, loop.time() - due))
