"""One event loop and Engine shared by the examples of a stateful fuzz target (a fresh Engine per
example would cost more than the example)."""

from __future__ import annotations

import asyncio

from fastsfu import Engine


class Loop:
    """One event loop and Engine for all examples: each example runs as a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.engine: Engine = self.loop.run_until_complete(self._engine())

    @staticmethod
    async def _engine() -> Engine:
        return Engine()

    def close(self) -> None:
        self.engine.close()
        self.loop.close()
