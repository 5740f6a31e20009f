from __future__ import annotations

import asyncio
import threading

from gpuaas.handlers.turns import DecidingTurns


def test_one_turn_at_a_time_in_the_order_asked() -> None:
    async def scenario() -> list[str]:
        turns, log = DecidingTurns(), []

        async def take(name: str) -> None:
            async with turns.turn():
                log.append(f"{name} in")
                await asyncio.sleep(0.01)
                log.append(f"{name} out")

        await asyncio.gather(take("a"), take("b"), take("c"))
        return log

    assert asyncio.run(scenario()) == ["a in", "a out", "b in", "b out", "c in", "c out"]


def test_a_turn_given_up_from_a_thread_lets_the_next_begin_before_the_block_ends() -> None:
    async def scenario() -> list[str]:
        turns, log = DecidingTurns(), []
        second_began = threading.Event()

        def pass_in_thread(give_up: object) -> None:
            assert callable(give_up)
            log.append("first gave up")
            give_up()
            give_up()  # twice is once: the next turn is not ended by it
            assert second_began.wait(5)
            log.append("first ends")

        async def first() -> None:
            async with turns.turn() as give_up:
                await asyncio.to_thread(pass_in_thread, give_up)

        async def second() -> None:
            await asyncio.sleep(0)  # asks after the first
            async with turns.turn():
                log.append("second began")
                second_began.set()
                await asyncio.sleep(0.05)
                log.append("second ends")

        async def third() -> None:
            await asyncio.sleep(0.01)
            async with turns.turn():
                log.append("third began")

        await asyncio.gather(first(), second(), third())
        return log

    assert asyncio.run(scenario()) == ["first gave up", "second began", "first ends", "second ends", "third began"]
