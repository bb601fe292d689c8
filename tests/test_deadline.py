"""The step path's coarse deadlines behave as asyncio.timeout does, a sweep period late."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from optserve import deadline as dl

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 uses anyio's")


@pytest.fixture(autouse=True)
def coarse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "COARSE_FROM", 0.0)  # short deadlines take the coarse path too


def test_a_stalled_block_times_out_within_a_sweep_period() -> None:
    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async with dl.deadline(0.3):
                await asyncio.sleep(10)
        return time.monotonic() - start

    waited = asyncio.run(main())
    assert 0.3 <= waited < 0.3 + dl.PERIOD + 1.0  # never early; late by a sweep (and load)


def test_a_block_in_time_is_left_alone_and_the_sweep_stops_when_idle() -> None:
    async def main() -> None:
        async with dl.deadline(0.2):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # past the deadline: no late cancellation arrives
        sweep = dl._SWEEPS[asyncio.get_running_loop()]
        assert not sweep.live and sweep.timer is None

    asyncio.run(main())


def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    async def blocked() -> None:
        async with dl.deadline(5):
            await asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.create_task(blocked())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_nested_deadlines_the_inner_expires_and_the_outer_goes_on() -> None:
    async def main() -> str:
        async with dl.deadline(5):
            try:
                async with dl.deadline(0.2):
                    await asyncio.sleep(10)
            except TimeoutError:
                pass
            await asyncio.sleep(0.3)
            return "outer finished"

    assert asyncio.run(main()) == "outer finished"


def test_many_concurrent_deadlines_only_the_late_ones_fire() -> None:
    # A loop stalled past a deadline (a busy machine) times out even the quick blocks, as
    # asyncio.timeout would: the margin between the two kinds is wide for that reason.
    async def one(i: int) -> str:
        try:
            async with dl.deadline(1.5):
                await asyncio.sleep(0.01 if i % 2 else 30)
            return "done"
        except TimeoutError:
            return "timeout"

    async def main() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(40)))

    out = asyncio.run(main())
    assert out == ["timeout" if i % 2 == 0 else "done" for i in range(40)]
