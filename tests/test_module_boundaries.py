"""Module boundaries that the rooms restructuring set up (docs/architecture.md, "Rooms"): front-ends
use the public rooms API, the core knows no protocol, and upward calls go through listeners."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "fastsfu"

# (pattern, the only files where it may appear, why)
RULES: list[tuple[str, frozenset[str], str]] = [
    (r"\bengine\._[a-z]", frozenset({"engine.py"}), "the engine's private names (use its public methods)"),
    (r"\b_Room\b", frozenset(), "the old private room class (use fastsfu.rooms.Room)"),
    (r"\brooms\._[a-z]", frozenset({"rooms.py"}), "the room registry's private names"),
    (r"\.router\._[a-z]", frozenset(), "upward calls into the router (use TransportListener)"),
    # ice_tcp.py is the engine's TCP side: it hands a transport its frames as the engine hands it
    # datagrams (_on_slow_datagram), a downward call.
    (
        r"\.transport\._[a-z]",
        frozenset({"ice_tcp.py"}),
        "upward calls into a transport (Producer/ConsumerListener)",
    ),
    (r"_discord_ssrc|parse_discovery_request", frozenset({"discord/udp_transport.py"}), "Discord discovery"),
    (r"_register_ufrag|_unregister_ufrag", frozenset(), "the engine's old ICE table (UfragTable claims)"),
]

# The core and the rooms layer import no front-end.
CORE = ("engine.py", "router.py", "transport.py", "producer.py", "consumer.py", "rooms.py")
FRONT_END_IMPORT = re.compile(r"^\s*(from|import)\s+fastsfu\.(harmony|discord)[\w.]*", re.MULTILINE)
# Router.create_discord_udp_transport stays for embedders and delegates to discord/ (lazily).
KEPT_IMPORTS = {("router.py", "from fastsfu.discord.udp_transport")}


def sources() -> dict[str, str]:
    return {p.relative_to(SRC).as_posix(): p.read_text() for p in sorted(SRC.rglob("*.py"))}


def violations(files: dict[str, str]) -> list[str]:
    found = []
    for pattern, allowed, why in RULES:
        for name, text in files.items():
            if name in allowed:
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if re.search(pattern, line):
                    found.append(f"{name}:{number}: {why}: {line.strip()}")
    for name in CORE:
        for match in FRONT_END_IMPORT.finditer(files.get(name, "")):
            if (name, match.group(0).strip()) in KEPT_IMPORTS:
                continue
            found.append(f"{name}: imports a front-end: {match.group(0).strip()}")
    if re.search(
        r"fastsfu\.(harmony|discord)", files.get("discord/voice.py", "").replace("fastsfu.discord", "")
    ):
        found.append("discord/voice.py: reaches into harmony (share fastsfu.rooms instead)")
    return found


def test_no_cross_module_private_reach_ins() -> None:
    files = sources()
    assert "rooms.py" in files and "engine.py" in files
    assert violations(files) == []


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("webrtc_transport.py", "        self.engine._register_ufrag(ufrag, self)"),
        ("discord/voice.py", "from fastsfu.harmony.session import VoiceRooms, _Room"),
        ("producer.py", "        self.transport.router._producer_closed(self)"),
        ("engine.py", "        from fastsfu.discord.udp_transport import parse_discovery_request"),
        ("rooms.py", "from fastsfu.harmony.session import VoiceError"),
        ("router.py", "from fastsfu.discord.voice import DiscordVoice"),
    ],
)
def test_the_check_catches_each_pattern_coming_back(name: str, line: str) -> None:
    files = sources()
    files[name] = files[name] + "\n" + line + "\n"
    assert violations(files), line
