"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def aiortc_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep aiortc's ICE on 127.0.0.1 (docs/testing.md#network-namespace): no other interface is ever used."""
    from aioice import ice as aioice_ice

    monkeypatch.setattr(aioice_ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
