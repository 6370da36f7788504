"""HTTP Datagrams in the Capsule Protocol (RFC 9297), as CONNECT-UDP (RFC 9298) carries UDP payloads
over an HTTP/2 stream: bytes in, UDP payloads out; UDP payloads in, bytes out.

Must never know: trio, sockets, HTTP/2 framing, which stream the bytes ride on.

Theory of operation
-------------------
A connect-udp stream's DATA is a sequence of capsules (RFC 9297 section 3.2):

    Capsule { Type (i), Length (i), Value (..) }

with (i) a QUIC variable-length integer (RFC 9000 section 16: the two high bits of the first byte give
its size, 1, 2, 4 or 8 bytes; non-minimal encodings are valid and accepted). A DATAGRAM capsule (type
0x00) holds one HTTP Datagram; for connect-udp its value is `Context ID (i)` followed by the payload, and
context 0 means "a whole UDP payload" (RFC 9298 section 4).

What the decoder does with what it meets:
- DATAGRAM with context 0: one UDP payload out, in order.
- DATAGRAM with another context id: dropped and counted (RFC 9298: no extension negotiated it).
- Any other capsule type: skipped byte by byte without buffering, whatever its length (RFC 9297 3.2:
  unknown capsule types are ignored), and counted.
- A DATAGRAM capsule longer than `max_datagram` + its context id: `CapsuleError` (a UDP payload cannot
  be larger than 65,527 bytes; more is a broken or hostile peer, and buffering it would be unbounded).
- A capsule cut short by the end of the stream: `finish()` raises `CapsuleError` (RFC 9297 3.3).

Memory: at most one capsule header (16 bytes) plus one datagram's value are held between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

DATAGRAM = 0x00  # RFC 9297 capsule type
UDP_CONTEXT = 0  # RFC 9298 context id: the value is a whole UDP payload
MAX_UDP_PAYLOAD = 65527  # 65,535 - 8 bytes of UDP header
MAX_VARINT = 2**62 - 1


class CapsuleError(ValueError):
    """The peer sent a malformed capsule stream (RFC 9297 3.3: abort the stream)."""


def encode_varint(value: int) -> bytes:
    """A QUIC variable-length integer, in its shortest form."""
    if value < 0:
        raise ValueError("a varint cannot be negative")
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    if value <= MAX_VARINT:
        return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise ValueError(f"{value} does not fit a varint (max 2**62-1)")


def decode_varint(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """(value, position after it) of the varint at `pos`; None if `data` ends before it does."""
    if pos >= len(data):
        return None
    first = data[pos]
    size = 1 << (first >> 6)
    end = pos + size
    if end > len(data):
        return None
    value = first & 0x3F
    for i in range(pos + 1, end):
        value = (value << 8) | data[i]
    return value, end


_ZERO_CONTEXT = encode_varint(UDP_CONTEXT)


def datagram_header(payload_size: int) -> bytes:
    """The bytes that go before a UDP payload of this size: DATAGRAM type, length, context id 0."""
    return b"\x00" + encode_varint(payload_size + len(_ZERO_CONTEXT)) + _ZERO_CONTEXT


def encode_datagram(payload: bytes | bytearray | memoryview) -> bytes:
    """One DATAGRAM capsule carrying `payload` as a UDP payload (context id 0)."""
    if len(payload) > MAX_UDP_PAYLOAD:
        raise ValueError(f"a UDP payload is at most {MAX_UDP_PAYLOAD} bytes, not {len(payload)}")
    return datagram_header(len(payload)) + bytes(payload)


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    """Any capsule (tests, and peers that want to send one we must skip)."""
    return encode_varint(capsule_type) + encode_varint(len(value)) + value


@dataclass(slots=True)
class CapsuleStatistics:
    datagrams: int = 0  # UDP payloads delivered
    unknown_context: int = 0  # DATAGRAM capsules with a context id other than 0, dropped
    skipped_capsules: int = 0  # capsules of other types, skipped
    skipped_bytes: int = 0


class CapsuleDecoder:
    """Incremental capsule parser for one stream. `feed(bytes) -> [udp payloads]`."""

    def __init__(self, max_datagram: int = MAX_UDP_PAYLOAD) -> None:
        if not 0 <= max_datagram <= MAX_UDP_PAYLOAD:
            raise ValueError(f"max_datagram must be 0..{MAX_UDP_PAYLOAD}")
        self.max_datagram = max_datagram
        self.stats = CapsuleStatistics()
        self._buf = bytearray()
        self._skip = 0  # bytes of an unknown capsule still to pass over

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete capsule."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Bytes from the stream, in order; returns the UDP payloads they complete."""
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            self.stats.skipped_bytes += taken
            view = view[taken:]
        if not self._buf:
            source: bytes | bytearray | memoryview = view
        else:
            self._buf += view
            source = self._buf
        out: list[bytes] = []
        pos = self._parse(source, out)
        if source is self._buf:
            del self._buf[:pos]
        else:
            self._buf += source[pos:]
        return out

    def _parse(self, src: bytes | bytearray | memoryview, out: list[bytes]) -> int:
        """Consume whole capsules from `src`; returns how far it got (the rest waits)."""
        pos = 0
        size = len(src)
        limit = self.max_datagram + 8  # the value: an 8-byte context id at most, then the payload
        while pos < size:
            head = decode_varint(src, pos)
            if head is None:
                break
            ctype, at = head
            length_field = decode_varint(src, at)
            if length_field is None:
                break
            length, start = length_field
            if ctype != DATAGRAM:
                self.stats.skipped_capsules += 1
                available = size - start
                if length > available:
                    # Skip the rest as it arrives, without holding it.
                    self._skip = length - available
                    self.stats.skipped_bytes += available
                    return size
                self.stats.skipped_bytes += length
                pos = start + length
                continue
            if length > limit:
                raise CapsuleError(f"DATAGRAM capsule of {length} bytes is larger than any UDP payload")
            end = start + length
            if end > size:
                break
            context = decode_varint(src, start)
            if context is None or context[1] > end:
                raise CapsuleError("DATAGRAM capsule too short for its context id")
            if context[0] != UDP_CONTEXT:
                self.stats.unknown_context += 1
            elif end - context[1] > self.max_datagram:
                raise CapsuleError(f"UDP payload of {end - context[1]} bytes is over {self.max_datagram}")
            else:
                out.append(bytes(src[context[1] : end]))
                self.stats.datagrams += 1
            pos = end
        return pos

    def finish(self) -> None:
        """The stream ended: a capsule cut in half is an error (RFC 9297 3.3)."""
        if self._buf or self._skip:
            raise CapsuleError(
                f"stream ended inside a capsule ({len(self._buf) + self._skip} bytes missing or held)"
            )
