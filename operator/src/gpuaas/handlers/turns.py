"""Turns at deciding: one pool's pass decides at a time (handlers.pools).

Five pools deciding at once in five threads each got a fifth of the interpreter lock, so each pass took five times
its own work, and decided from a snapshot older by the others' work. A pool takes its snapshot in its turn and gives
the turn up from its pass's thread as soon as it has decided: the writes it waits for after that hold nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable


class DecidingTurns:
    def __init__(self) -> None:
        self._lock = asyncio.Lock()  # hands turns out in the order they were asked for

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[Callable[[], None]]:
        """Waits for the turn; yields `give_up`, which any thread may call. The turn also ends with the block."""
        await self._lock.acquire()
        loop = asyncio.get_running_loop()
        ended = False

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._lock.release()

        def give_up() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the operator is exiting
                loop.call_soon_threadsafe(end)

        try:
            yield give_up
        finally:
            end()
