"""Default token auth: HS256 tokens, expiry, wrong secret, garbage (docs/harmony.md#authentication)."""

from __future__ import annotations

import jwt
import pytest

from fastsfu.harmony import VoiceError
from fastsfu.harmony.auth import TokenAuth, generate_secret

SECRET = "a-test-secret-of-at-least-32-bytes-0123456789"


def test_round_trip_with_large_user_ids() -> None:
    auth = TokenAuth(generate_secret())
    assert auth.authenticate(auth.mint(2**63 + 9)) == 2**63 + 9


@pytest.mark.parametrize(
    ("token", "identifier"),
    [
        ("", "h.blank-session"),
        ("garbage", "h.blank-session"),
        (TokenAuth("another-secret-that-is-long-enough-0123").mint(1), "h.blank-session"),
        (TokenAuth(SECRET).mint(1, ttl=-120), "h.bad-session"),
        (
            jwt.encode({"sub": "1", "iss": "fastsfu", "exp": 2**40}, SECRET, algorithm="HS512"),
            "h.blank-session",
        ),
        (
            jwt.encode({"sub": "x", "iss": "fastsfu", "exp": 2**40}, SECRET, algorithm="HS256"),
            "h.blank-session",
        ),
        (
            jwt.encode({"sub": "1", "iss": "fastsfu"}, SECRET, algorithm="HS256"),
            "h.blank-session",
        ),  # no exp
        (jwt.encode({"sub": "1", "iss": "fastsfu", "exp": 2**40}, "", algorithm="none"), "h.blank-session"),
    ],
)
def test_bad_tokens_are_refused(token: str, identifier: str) -> None:
    with pytest.raises(VoiceError) as exc:
        TokenAuth(SECRET).authenticate(token)
    assert exc.value.identifier == identifier


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenAuth("")
