"""The capsule codec (RFC 9297 / RFC 9298 context 0): table tests, then Hypothesis round trips over
arbitrary payloads and arbitrary ways of cutting the byte stream."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.hbone.capsule import (
    MAX_UDP_PAYLOAD,
    CapsuleDecoder,
    CapsuleError,
    decode_varint,
    encode_capsule,
    encode_datagram,
    encode_varint,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        # RFC 9000 appendix A.1's examples.
        (151288809941952652, bytes.fromhex("c2197c5eff14e88c")),
        (494878333, bytes.fromhex("9d7f3e7d")),
        (15293, bytes.fromhex("7bbd")),
        (37, bytes.fromhex("25")),
    ],
)
def test_varint_matches_rfc9000_examples(value: int, wire: bytes) -> None:
    assert encode_varint(value) == wire
    assert decode_varint(wire) == (value, len(wire))


def test_varint_non_minimal_encoding_is_accepted() -> None:
    assert decode_varint(bytes.fromhex("4025")) == (37, 2)  # RFC 9000 A.1: 37 in two bytes


def test_varint_incomplete_is_none() -> None:
    assert decode_varint(b"") is None
    assert decode_varint(bytes.fromhex("9d7f")) is None


def test_varint_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_varint(2**62)
    with pytest.raises(ValueError):
        encode_varint(-1)


def test_datagram_wire_form() -> None:
    # type 0, length 4 (context id + 3 bytes), context 0, payload
    assert encode_datagram(b"abc") == b"\x00\x04\x00abc"
    assert encode_datagram(b"") == b"\x00\x01\x00"
    assert CapsuleDecoder().feed(b"\x00\x01\x00") == [b""]


def test_unknown_capsules_are_skipped_even_when_large_and_split() -> None:
    dec = CapsuleDecoder()
    big = encode_capsule(0x2A, b"x" * 100_000)
    stream = encode_datagram(b"one") + big + encode_datagram(b"two")
    out = []
    for i in range(0, len(stream), 1000):
        out += dec.feed(stream[i : i + 1000])
        assert dec.buffered < 2000  # the unknown capsule is never held
    assert out == [b"one", b"two"]
    assert dec.stats.skipped_capsules == 1
    assert dec.stats.skipped_bytes == 100_000
    dec.finish()


def test_unknown_context_id_is_dropped_and_counted() -> None:
    dec = CapsuleDecoder()
    other = encode_capsule(0, encode_varint(2) + b"compressed")
    assert dec.feed(other + encode_datagram(b"ok")) == [b"ok"]
    assert dec.stats.unknown_context == 1


def test_oversized_datagram_is_an_error() -> None:
    with pytest.raises(CapsuleError):
        CapsuleDecoder().feed(b"\x00" + encode_varint(MAX_UDP_PAYLOAD + 100))
    with pytest.raises(ValueError):
        encode_datagram(b"x" * (MAX_UDP_PAYLOAD + 1))
    with pytest.raises(CapsuleError):
        CapsuleDecoder(max_datagram=10).feed(encode_datagram(b"x" * 11))


def test_empty_datagram_capsule_without_context_is_an_error() -> None:
    with pytest.raises(CapsuleError):
        CapsuleDecoder().feed(b"\x00\x00")


def test_truncated_stream_fails_finish() -> None:
    dec = CapsuleDecoder()
    assert dec.feed(encode_datagram(b"hello")[:-1]) == []
    with pytest.raises(CapsuleError):
        dec.finish()


@FAST
@given(
    payloads=st.lists(st.binary(max_size=1500), max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=50_000), max_size=20),
    noise=st.lists(st.tuples(st.integers(1, 2**62 - 1), st.binary(max_size=300)), max_size=5),
)
def test_round_trip_any_cut(payloads: list[bytes], cuts: list[int], noise: list[tuple[int, bytes]]) -> None:
    """Whatever the payloads, however the stream is cut, with unknown capsules between: the same
    payloads come out, in order, and nothing is left held."""
    pieces = [encode_datagram(p) for p in payloads]
    for i, (ctype, value) in enumerate(noise):
        pieces.insert(min(i * 2, len(pieces)), encode_capsule(ctype, value))
    stream = b"".join(pieces)
    dec = CapsuleDecoder()
    out: list[bytes] = []
    pos = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        out += dec.feed(stream[pos:cut])
        pos = max(pos, cut)
    out += dec.feed(memoryview(stream)[pos:])
    assert out == payloads
    dec.finish()
    assert dec.buffered == 0


@FAST
@given(st.binary(max_size=4000))
def test_arbitrary_bytes_raise_only_capsule_error(data: bytes) -> None:
    dec = CapsuleDecoder()
    try:
        for payload in dec.feed(data):
            assert len(payload) <= MAX_UDP_PAYLOAD
    except CapsuleError:
        return
    assert dec.buffered <= MAX_UDP_PAYLOAD + 16
