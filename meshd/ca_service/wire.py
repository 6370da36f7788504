"""The enrollment endpoint's messages: 4-byte big-endian length, then a JSON object (at most 64 KiB).

Exchange (over TLS, server certificate issued by the CA's signing root; no client certificate):
  server -> {"bundle": PEM, "trust_domain": TD}            greeting, sent right after the handshake
  client -> {"token": T, "csr": PEM}                        only after the client checked its pin
  server -> {"ok": true, "cert": PEM chain, "bundle": PEM, "ca_identity": URI, "hbone_port": N}
         or {"ok": false, "error": reason}
"""

from __future__ import annotations

import json
import struct
from typing import Any

import trio

MAX_MESSAGE = 64 * 1024


class WireError(Exception):
    """The peer sent something that is not a message."""


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    return struct.pack("!I", len(data)) + data


def decode(frame: bytes) -> dict[str, Any]:
    """One complete frame -> its object."""
    if len(frame) < 4:
        raise WireError("truncated message")
    (n,) = struct.unpack_from("!I", frame)
    if n > MAX_MESSAGE or len(frame) != 4 + n:
        raise WireError("bad message length")
    try:
        obj = json.loads(frame[4:])
    except ValueError:
        raise WireError("message is not JSON") from None
    if not isinstance(obj, dict):
        raise WireError("message is not a JSON object")
    return obj


async def receive(stream: trio.abc.ReceiveStream) -> dict[str, Any]:
    buf = bytearray()
    need = 4
    while len(buf) < need:
        chunk = await stream.receive_some(need - len(buf))
        if not chunk:
            raise WireError("connection closed mid-message")
        buf += chunk
        if need == 4 and len(buf) == 4:
            (n,) = struct.unpack("!I", buf)
            if n > MAX_MESSAGE:
                raise WireError("message too large")
            need = 4 + n
    return decode(bytes(buf))


async def send(stream: trio.abc.SendStream, message: dict[str, Any]) -> None:
    await stream.send_all(encode(message))
