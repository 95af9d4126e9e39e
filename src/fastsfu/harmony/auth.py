"""Default authentication: HS256-signed tokens (JWT, RFC 7519) whose subject is the Harmony user ID.

A homeserver can plug in its own `authenticate(token) -> user_id` instead (harmony.md §2.3).
"""

from __future__ import annotations

import secrets
import time

import jwt

from fastsfu.harmony.session import VoiceError

ISSUER = "fastsfu"


def generate_secret() -> str:
    return secrets.token_urlsafe(32)


class TokenAuth:
    """Mints and verifies tokens signed with a shared secret (HS256)."""

    def __init__(self, secret: str | bytes, leeway: float = 30.0) -> None:
        if not secret:
            raise ValueError("the token secret must not be empty")
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.leeway = leeway

    def mint(self, user_id: int, ttl: float = 86400.0) -> str:
        if not 0 <= user_id < 2**64:
            raise ValueError("user ids are unsigned 64-bit integers")
        now = int(time.time())
        claims = {"sub": str(user_id), "iss": ISSUER, "iat": now, "exp": now + int(ttl)}
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def authenticate(self, token: str) -> int:
        """The user ID of a valid token; VoiceError h.blank-session / h.bad-session otherwise."""
        if not token:
            raise VoiceError("h.blank-session", "no session token")
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=["HS256"],
                issuer=ISSUER,
                leeway=self.leeway,
                options={"require": ["exp", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise VoiceError("h.bad-session", "session token expired") from None
        except jwt.InvalidTokenError:
            raise VoiceError("h.blank-session", "invalid session token") from None
        try:
            user_id = int(claims["sub"])
        except (TypeError, ValueError):
            raise VoiceError("h.blank-session", "invalid subject in session token") from None
        if not 0 <= user_id < 2**64:
            raise VoiceError("h.blank-session", "invalid subject in session token")
        return user_id


class StaticTokens:
    """A fixed token -> user ID map, for development and tests (harmony.md §2.3)."""

    def __init__(self, tokens: dict[str, int]) -> None:
        self.tokens = dict(tokens)

    def authenticate(self, token: str) -> int:
        try:
            return self.tokens[token]
        except KeyError:
            raise VoiceError("h.blank-session", "unknown session token") from None
