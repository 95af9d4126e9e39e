"""Shared fuzz strategies: byte mutations of valid seeds, JSON value mutations, corpus files, budgets.

A mutation is drawn from Hypothesis (not from a private RNG), so failures shrink to a small edit.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

CORPUS = Path(__file__).parent / "corpus"

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
INTERESTING_U16 = (0, 1, 2, 3, 4, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)


def budget(ci_examples: int) -> settings:
    """`ci_examples` in the "ci" profile, scaled by the active profile (x100 for "long") or by
    FASTSFU_FUZZ_SCALE when set (docs/fuzzing.md)."""
    scale = float(os.environ.get("FASTSFU_FUZZ_SCALE") or settings.default.max_examples / 100)
    return settings(max_examples=max(1, int(ci_examples * scale)))


def corpus(target: str) -> list[bytes]:
    """Regression inputs of one target: tests/fuzz/corpus/<target>/*.hex (hex text, '#' comments)."""
    out = []
    for path in sorted((CORPUS / target).glob("*.hex")):
        text = "".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        out.append(bytes.fromhex("".join(text.split())))
    return out


Edit = tuple[int, int, int, bytes]  # (operation, position, argument, inserted bytes)


def edits(max_edits: int = 4) -> st.SearchStrategy[list[Edit]]:
    """Byte edits drawn before the bytes they apply to are known: positions are reduced modulo the
    length later, so the draws replay even when a live peer's datagram changes size from one run
    to the next (ECDSA signatures do)."""
    edit = st.tuples(
        st.integers(0, 8), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(min_size=1, max_size=32)
    )
    return st.lists(edit, max_size=max_edits)


def apply_edits(seed: bytes, edit_list: list[Edit]) -> bytes:
    """Bit flips, interesting bytes and 16-bit lengths, inserts, deletions, truncation,
    duplicated chunks, overwrites, small arithmetic."""
    data = bytearray(seed)
    for op, pos, arg, blob in edit_list:
        n = len(data)
        i = pos % n if n else 0
        if op == 0 and n:
            data[i] ^= 1 << (arg % 8)
        elif op == 1 and n:
            data[i] = INTERESTING_BYTES[arg % len(INTERESTING_BYTES)]
        elif op == 2 and n:
            choices = (*INTERESTING_U16, n, n - i, n + 4)
            data[i : i + 2] = (choices[arg % len(choices)] & 0xFFFF).to_bytes(2, "big")
        elif op == 3:
            data[pos % (n + 1) : pos % (n + 1)] = blob
        elif op == 4:
            del data[i : i + 1 + arg % 32]
        elif op == 5:
            del data[pos % (n + 1) :]
        elif op == 6 and n:
            chunk = data[i : i + 1 + arg % 64]
            k = (arg >> 6) % (n + 1)
            data[k:k] = chunk
        elif op == 7:
            data[i : i + len(blob) % 4 + 1] = blob[:4]
        elif op == 8 and n:
            data[i] = (data[i] + (-1, 1, -2, 2, 16, -16)[arg % 6]) & 0xFF
    return bytes(data)


def mutated(seed: bytes, max_edits: int = 4) -> st.SearchStrategy[bytes]:
    """`seed` with 0..max_edits byte edits."""
    return edits(max_edits).map(lambda e: apply_edits(seed, e))


def seeded(seeds: list[bytes], random_max: int = 256) -> st.SearchStrategy[bytes]:
    """Half pure random bytes, half mutations of the seeds (and the corpus)."""
    picks = st.sampled_from(seeds).flatmap(mutated)
    return st.one_of(st.binary(max_size=random_max), picks)


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, 65535, 65536, 127, 128, 256]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.sampled_from(["", "0", "-1", "1e400", "audio/opus", "opus", "webrtc", "udp", "\u0000", "\ud800"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_json(draw: st.DrawFn, seed: Any, max_edits: int = 3) -> Any:
    """A deep copy of `seed` with values replaced by other JSON (wrong types, huge numbers, NaN),
    keys deleted, list items duplicated or dropped."""
    value = copy.deepcopy(seed)
    for _ in range(draw(st.integers(0, max_edits))):
        path = draw(st.sampled_from(_paths(value)))
        replacement = draw(JSON_VALUES)
        if not path:
            value = replacement
            continue
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = draw(st.integers(0, 3))
        if op == 0:
            del parent[key]
        elif op == 1 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op == 2 and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = replacement
        else:
            parent[key] = replacement
    return value


def json_text(seed: Any) -> st.SearchStrategy[str]:
    """JSON text of a mutated value, or the seed's text with byte edits (often not JSON at all)."""
    as_json = mutated_json(seed).map(lambda v: json.dumps(v))
    as_bytes = mutated(json.dumps(seed).encode()).map(lambda b: b.decode("utf-8", "replace"))
    return st.one_of(as_json, as_bytes)
