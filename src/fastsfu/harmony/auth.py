"""Default authentication: HS256-signed tokens (JWT, RFC 7519) whose subject is the Harmony user ID,
and a static (guild, channel) authorization policy. A homeserver can plug in its own
`authenticate(token) -> user_id`, `authorize(user_id, guild_id, channel_id)`; docs/harmony.md#authentication.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

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
    """A fixed token -> user ID map, for development and tests (docs/harmony.md#authentication)."""

    def __init__(self, tokens: dict[str, int]) -> None:
        self.tokens = dict(tokens)

    def authenticate(self, token: str) -> int:
        try:
            return self.tokens[token]
        except KeyError:
            raise VoiceError("h.blank-session", "unknown session token") from None


@dataclass(frozen=True)
class GuildPolicy:
    """What a static policy knows of one guild; None means "any"."""

    voice_channels: frozenset[int] | None = None  # None: every other channel ID is a voice channel
    other_channels: frozenset[int] = field(default_factory=frozenset)  # exist, but not voice channels
    members: frozenset[int] | None = None  # None: every authenticated user is a member


class StaticAuthorization:
    """`authorize(user_id, guild_id, channel_id)` from a table of guilds (docs/harmony.md#authentication);
    for a voice server without a homeserver hook, and for tests."""

    def __init__(self, guilds: dict[int, GuildPolicy]) -> None:
        self.guilds = dict(guilds)

    def authorize(self, user_id: int, guild_id: int, channel_id: int) -> None:
        guild = self.guilds.get(guild_id)
        if guild is None:
            raise VoiceError("h.bad-guild-id", f"no guild {guild_id}")
        if guild.members is not None and user_id not in guild.members:
            raise VoiceError("h.not-joined", f"not a member of guild {guild_id}")
        if channel_id in guild.other_channels:
            raise VoiceError("fastsfu.voice-not-voice-channel", f"{channel_id} is not a voice channel")
        if guild.voice_channels is not None and channel_id not in guild.voice_channels:
            raise VoiceError("h.bad-channel-id", f"no channel {channel_id} in guild {guild_id}")
