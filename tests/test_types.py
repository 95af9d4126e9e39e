"""fastsfu.types has teeth: an embedder's code type-checks under mypy --strict, wrong keys and values
do not, and the dicts the running API returns have exactly the keys and value types declared."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints, is_typeddict

import typing_check

ROOT = Path(__file__).resolve().parents[1]

# Each marked line must draw a mypy error containing the marked text; no other line may.
# Written without annotations of its own: with dict[str, Any] in the API all of it type-checks.
WRONG_USAGE = """\
from fastsfu import Engine


def misuse(engine: Engine) -> None:
    router = engine.create_router(
        [{"kind": "audio", "mimeType": "audio/opus", "clockrate": 48000}]  # E: "clockrate"
    )
    transport = router.create_plain_transport()
    producer = transport.produce(
        {"codecs": [{"mimeType": "audio/opus", "payloadTyp": 111, "clockRate": 48000}]}  # E: "payloadTyp"
    )
    transport.consume(
        producer.id,
        {"codecs": [{"kind": "voice", "mimeType": "audio/opus", "clockRate": 48000}]},  # E: 'voice'
    )
    transport.connect("127.0.0.1", 5004, {"cryptoSuite": "AES_CM_128_HMAC_SHA1_80"})  # E: "SrtpParameters
    webrtc = router.create_webrtc_transport()
    webrtc.connect({"role": "passive", "fingerprints": []})  # E: 'passive'
    lost = producer.get_stats()[0]["packetsLots"]  # E: "packetsLots"
    forwarded = engine.stats()["forwarded"]  # E: "forwarded"
    pt: str = router.rtp_capabilities["codecs"][0]["preferredPayloadType"]  # E: "int"
    port: str = webrtc.ice_candidates[0]["port"]  # E: "int"
    print(lost, forwarded, pt, port)
"""


def mypy(*files: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict with the project's configuration (pyproject.toml), on this tree's sources."""
    env = {**os.environ, "MYPYPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", *map(str, files)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )


def test_embedder_code_type_checks_under_mypy_strict() -> None:
    result = mypy(Path(typing_check.__file__))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found in 1 source file"), result.stdout


def test_readme_embedding_example_type_checks_under_mypy_strict(tmp_path: Path) -> None:
    (example,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    snippet = tmp_path / "readme_example.py"
    snippet.write_text(example)
    result = mypy(snippet)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_rejects_wrong_keys_and_values(tmp_path: Path) -> None:
    snippet = tmp_path / "typing_wrong.py"
    snippet.write_text(WRONG_USAGE)
    expected = {
        n: m.group(1)
        for n, line in enumerate(WRONG_USAGE.splitlines(), 1)
        if (m := re.search(r"# E: (.+)$", line))
    }
    result = mypy(snippet)
    assert result.returncode == 1, result.stdout + result.stderr
    errors: dict[int, list[str]] = {}
    for line in result.stdout.splitlines():
        m = re.match(r".*typing_wrong\.py:(\d+): error: (.*)", line)
        if m:
            errors.setdefault(int(m.group(1)), []).append(m.group(2))
    assert set(errors) == set(expected), result.stdout
    for n, text in expected.items():
        assert any(text in message for message in errors[n]), (n, text, errors[n])


# ---------------------------------------------------------------- run time: values against the declarations


def problems(value: object, tp: Any, path: str) -> list[str]:
    """What in `value` disagrees with the type `tp` (TypedDicts, containers, literals, scalars)."""
    origin = get_origin(tp)
    if is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not a dict"]
        hints = get_type_hints(tp)
        out = [f"{path}: no {k!r}" for k in sorted(tp.__required_keys__) if k not in value]
        out += [f"{path}: undeclared {k!r}" for k in value if k not in hints]
        for k, v in value.items():
            if k in hints:
                out += problems(v, hints[k], f"{path}.{k}")
        return out
    if origin in (typing.Union, types.UnionType):
        if any(not problems(value, arg, path) for arg in get_args(tp)):
            return []
        return [f"{path}: {value!r} is not {tp}"]
    if origin is Literal:
        return [] if value in get_args(tp) else [f"{path}: {value!r} is not {tp}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list"]
        return [p for i, item in enumerate(value) for p in problems(item, get_args(tp)[0], f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not a dict"]
        key_type, value_type = get_args(tp)
        return [
            p
            for k, v in value.items()
            for p in problems(k, key_type, path) + problems(v, value_type, f"{path}.{k}")
        ]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, tuple) or len(value) != len(args):
            return [f"{path}: {value!r} is not {tp}"]
        return [p for v, a in zip(value, args, strict=True) for p in problems(v, a, path)]
    if tp is type(None):
        return [] if value is None else [f"{path}: {value!r} is not None"]
    if tp in (int, float):  # JSON numbers; bool is no number here
        ok = isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r} is not {tp.__name__}"]
    if tp in (str, bool):
        return [] if isinstance(value, tp) else [f"{path}: {value!r} is not {tp.__name__}"]
    raise AssertionError(f"{path}: no check for {tp!r}")


def test_problems_finds_undeclared_missing_and_mistyped_keys() -> None:
    from fastsfu.types import RtpParameters

    good = {"codecs": [{"mimeType": "audio/opus", "payloadType": 111, "clockRate": 48000}]}
    assert problems(good, RtpParameters, "p") == []
    bad = {"codecs": [{"mimeType": "audio/opus", "payloadTyp": 111, "clockRate": "48000"}], "mid": 3}
    assert problems(bad, RtpParameters, "p") == [
        "p.codecs[0]: no 'payloadType'",
        "p.codecs[0]: undeclared 'payloadTyp'",
        "p.codecs[0].clockRate: '48000' is not int",
        "p.mid: 3 is not str",
    ]


def test_what_the_api_returns_matches_its_typeddicts() -> None:
    snapshot = asyncio.run(asyncio.wait_for(typing_check.run_room(), 20))
    hints = get_type_hints(typing_check.Snapshot, vars(typing_check))
    found = {name: problems(getattr(snapshot, name), tp, name) for name, tp in hints.items()}
    assert {name: p for name, p in found.items() if p} == {}
    # The datapath's counters moved (the packets went through the real sockets).
    assert snapshot.producer_stats[0]["packetCount"] == typing_check.PACKETS
    assert snapshot.producer_stats[0]["highestSequenceNumber"] == typing_check.PACKETS - 1
    assert snapshot.engine_stats["forwarded_packets"] == typing_check.PACKETS
    assert snapshot.datapath_consumer_stats["last_seq"] is not None
    assert snapshot.datapath_transport_stats["remote"] == (
        "127.0.0.1",
        snapshot.plain_dump["tuple"]["remotePort"],
    )
    # The optional keys of each transport class are present on that class's stats only.
    assert "iceState" in snapshot.webrtc_stats[0] and "iceState" not in snapshot.plain_stats[0]


def test_engine_stats_repeat_every_datapath_key() -> None:
    """EngineStats lists DatapathStats' keys again (pdoc cannot place inherited TypedDict keys):
    the two lists must not drift apart."""
    from fastsfu.types import DatapathStats, EngineStats

    assert set(DatapathStats.__annotations__) <= set(EngineStats.__annotations__)
