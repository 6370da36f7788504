"""A raw HTTP/2 peer for hostile tests: mTLS with a certificate from the mesh CA, then whatever frames
the test writes (h2's own client refuses to break the protocol, so frames are built by hand)."""

from __future__ import annotations

import socket
import ssl
import time

from hpack import Encoder
from hyperframe.frame import Frame, HeadersFrame, SettingsFrame

from meshd.hbone.tls import client_context
from meshd.identity.ca import IssuedCert

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class RawPeer:
    def __init__(
        self, address: tuple[str, int], issued: IssuedCert, ca_pem: bytes, timeout: float = 20
    ) -> None:
        ctx = client_context(issued.cert_pem, issued.key_pem, ca_pem)
        tcp = socket.create_connection(address, timeout=timeout)
        self.sock: ssl.SSLSocket = ctx.wrap_socket(tcp, server_hostname=None)
        self.encoder = Encoder()
        self._buf = b""
        self.closed = False
        self.send(PREFACE + SettingsFrame(0).serialize())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def headers(self, stream_id: int, headers: list[tuple[str, str]], *, end_headers: bool = True) -> bytes:
        f = HeadersFrame(stream_id, data=self.encoder.encode(headers))
        if end_headers:
            f.flags.add("END_HEADERS")
        return bytes(f.serialize())

    def connect(self, stream_id: int, authority: str) -> bytes:
        return self.headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])

    def frames(self, until: float) -> list[Frame]:
        """Frames received until `until` (monotonic) or the peer closes (then `closed` is set)."""
        out: list[Frame] = []
        while time.monotonic() < until and not self.closed:
            while len(self._buf) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self._buf[:9]))
                if len(self._buf) < 9 + length:
                    break
                frame.parse_body(memoryview(self._buf[9 : 9 + length]))
                self._buf = self._buf[9 + length :]
                out.append(frame)
            if out:
                return out
            self.sock.settimeout(max(0.01, until - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                self.closed = True
            self._buf += data
        return out

    def wait_closed(self, timeout: float) -> bool:
        """Read (and drop) frames until the daemon hangs up; True if it did within `timeout`."""
        until = time.monotonic() + timeout
        while not self.closed and time.monotonic() < until:
            self.frames(until)
        return self.closed

    def close(self) -> None:
        self.sock.close()
