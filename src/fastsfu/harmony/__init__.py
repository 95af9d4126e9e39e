"""Harmony voice (protocol.voice.v1): the session state machine shared by the gRPC and hRPC front-ends."""

from fastsfu.harmony.session import VoiceError, VoiceRooms, VoiceSession, VoiceSettings

__all__ = ["VoiceError", "VoiceRooms", "VoiceSession", "VoiceSettings"]
