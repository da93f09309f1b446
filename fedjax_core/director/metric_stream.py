"""The notebook's metric stream: an experiment's events as the director records them, look by look.

Both metric RPCs (``StreamMetrics``, one event a message, and ``StreamMetricBatches``, one look a
message) read it; the servicer checks who asks before.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from fedjax_core import records as r
from fedjax_core.director.concurrency import EVERYTHING, MAX_LONG_POLL_S, NOTEBOOKS, Flow
from fedjax_core.director.core import Director

# After a look that found events, a following stream lets more gather this long before it looks again: each
# report and upload wakes it, so a round of hundreds of envoys is a few looks (database reads and messages) a
# second instead of one per envoy. The first event of a burst still goes at once.
SETTLE_S = 0.1


async def event_lists(director: Director, flow: Flow, name: str, snapshot: bool,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[list[r.MetricEvent]]:
    """Experiment ``name``'s events as lists, one per look at the database (never empty), the last one ending
    with the 'done' event once the experiment has ended. ``snapshot``: only the events recorded so far (and
    'done' if it has ended), without waiting for more; else it follows, holding one of the notebooks' waiting
    slots, until 'done' or the director closes."""
    catalog = director.catalog
    last_id = 0
    if snapshot:
        while True:
            rows, done = await flow.short(catalog.events_after, name, last_id)
            if rows:
                last_id = rows[-1][0]
                yield [event for _, event in rows]
            else:
                if done is not None:
                    yield [done]
                return
    async with flow.waiting(context, NOTEBOOKS):
        while not director.closed:
            rows, done = await flow.poll(EVERYTHING, lambda: catalog.events_after(name, last_id),
                                         lambda b: bool(b[0]) or b[1] is not None or director.closed, MAX_LONG_POLL_S)
            events = [event for _, event in rows] + ([done] if done is not None else [])
            if rows:
                last_id = rows[-1][0]
            if events:
                yield events
            if done is not None:
                return
            if events:
                await asyncio.sleep(SETTLE_S)
