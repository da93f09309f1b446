"""The director server's event-loop helpers: Batches, items handed in one at a time on the loop and handled
together on a thread of their own."""
from __future__ import annotations

import asyncio
import threading

import pytest

from fedjax_core.director.concurrency import Batches


def _run(coroutine):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def test_items_that_arrive_while_a_batch_runs_go_together_in_the_next():
    batches_seen: list[list[int]] = []
    first_started, release = threading.Event(), threading.Event()

    def handle(batch: list[int]) -> list:
        batches_seen.append(batch)
        if batch == [0]:
            first_started.set()
            assert release.wait(10)
        return [item * 10 for item in batch]

    async def main():
        batches = Batches(asyncio.get_running_loop(), handle, "test-batches")
        try:
            first = asyncio.ensure_future(batches.run(0))
            assert await asyncio.to_thread(first_started.wait, 10)
            later = [asyncio.ensure_future(batches.run(i)) for i in (1, 2, 3)]
            await asyncio.sleep(0)  # all three queued behind the running batch
            release.set()
            return await first, await asyncio.gather(*later)
        finally:
            batches.close()

    assert _run(main()) == (0, [10, 20, 30])
    assert batches_seen == [[0], [1, 2, 3]]


def test_an_exception_answers_its_own_item_and_a_failed_batch_answers_all():
    def handle(batch: list[int]) -> list:
        if 99 in batch:
            raise OSError("the disk went away")
        return [ValueError(f"item {item} refused") if item < 0 else item for item in batch]

    async def main():
        batches = Batches(asyncio.get_running_loop(), handle, "test-batches")
        try:
            answers = await asyncio.gather(batches.run(1), batches.run(-2), return_exceptions=True)
            failed = await asyncio.gather(batches.run(99), return_exceptions=True)
            return answers, failed, await batches.run(3)  # the batches go on after a failed one
        finally:
            batches.close()

    answers, failed, after = _run(main())
    assert answers[0] == 1 and isinstance(answers[1], ValueError) and "item -2" in str(answers[1])
    assert isinstance(failed[0], OSError) and after == 3


def test_an_item_whose_caller_went_away_is_handled_all_the_same():
    handled: list[int] = []
    started, release = threading.Event(), threading.Event()

    def handle(batch: list[int]) -> list:
        started.set()
        assert release.wait(10)
        handled.extend(batch)
        return batch

    async def main():
        batches = Batches(asyncio.get_running_loop(), handle, "test-batches")
        try:
            call = asyncio.ensure_future(batches.run(7))
            assert await asyncio.to_thread(started.wait, 10)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            release.set()
            return await batches.run(8)
        finally:
            batches.close()

    assert _run(main()) == 8
    assert handled == [7, 8]


def test_a_closed_batches_refuses_new_items_with_a_message():
    async def main():
        batches = Batches(asyncio.get_running_loop(), lambda batch: batch, "test-batches")
        batches.close()
        with pytest.raises(ConnectionError, match="shutting down"):
            await batches.run(1)

    _run(main())

