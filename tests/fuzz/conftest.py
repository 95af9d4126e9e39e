"""Hypothesis profiles for the fuzz targets: "ci" (bounded, the default) and "long" (docs/fuzzing.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from engine_loop import Loop
from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,  # a DTLS handshake or a room join per example: wall time varies on a shared CI box
    "derandomize": False,  # every CI run explores new inputs; failures print a reproduction blob
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "database": None,  # no .hypothesis/ in the tree: a failure becomes an @example or a corpus file
}
# max_examples is per target; the targets scale it with their own cost (mutations.examples()).
settings.register_profile("ci", max_examples=100, **_COMMON)
settings.register_profile("long", max_examples=10_000, **_COMMON)
settings.load_profile(os.environ.get("FASTSFU_FUZZ_PROFILE", "ci"))


@pytest.fixture(scope="module")
def media() -> Iterator[Loop]:
    """The stateful targets' shared event loop and Engine, one per test module."""
    media = Loop()
    yield media
    media.close()
