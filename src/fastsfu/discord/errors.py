"""GatewayError: how the core and its handler refuse something; the WebSocket closes with `.code`."""

from __future__ import annotations

from fastsfu.discord.opcodes import CLOSE_MEANINGS


class GatewayError(Exception):
    """Close the WebSocket with `code` (4000-4999, docs/discord.md#close-codes) and `reason`."""

    def __init__(self, code: int, reason: str = "") -> None:
        if not 4000 <= code <= 4999:
            raise ValueError(f"voice close codes are 4000-4999, not {code}")  # never 1000 for a kick
        self.code = int(code)
        self.reason = reason or CLOSE_MEANINGS.get(code, "error")
        super().__init__(f"{self.code}: {self.reason}")
