"""An OTLP/HTTP trace receiver for tests: decodes each `POST /v1/traces` with the official
`opentelemetry-proto` messages, so a field the spec does not define, or an id of the wrong length,
fails the test.

OTLP's JSON differs from protobuf's JSON mapping in one place: trace and span ids are hex, where
protobuf writes bytes as base64. `decode` turns the ids into base64 and lets `json_format.Parse`
(unknown fields rejected) do the rest.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.support.http_backend import QuietServer, serving

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in _ID_FIELDS and isinstance(v, str):
                out[k] = base64.b64encode(bytes.fromhex(v)).decode()
            else:
                out[k] = _hex_ids_to_base64(v)
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    return node


def decode(body: bytes) -> ExportTraceServiceRequest:
    """An OTLP/JSON body as the protobuf message (ValueError/ParseError if it is not one)."""
    message = ExportTraceServiceRequest()
    json_format.Parse(json.dumps(_hex_ids_to_base64(json.loads(body))), message)
    return message


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: int


def spans_of(message: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for rs in message.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                assert len(s.trace_id) == 16 and len(s.span_id) == 8, s
                assert len(s.parent_span_id) in (0, 8), s
                out.append(
                    ReceivedSpan(
                        resource.get("service.name", ""),
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.parent_span_id.hex(),
                        s.name,
                        s.kind,
                        s.start_time_unix_nano,
                        s.end_time_unix_nano,
                        {a.key: _value(a.value) for a in s.attributes},
                        s.status.code,
                    )
                )
    return out


@dataclass
class Receiver:
    url: str = ""
    delay: float = 0.0  # seconds before each answer: a slow collector
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)


@contextmanager
def otlp_receiver(host: str, delay: float = 0.0) -> Iterator[Receiver]:
    receiver = Receiver(delay=delay)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if receiver.delay:
                time.sleep(receiver.delay)
            status = 200
            try:
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/json":
                    raise ValueError(f"{self.path} {self.headers.get('content-type')}")
                spans = spans_of(decode(body))
            except Exception as exc:
                with receiver.lock:
                    receiver.errors.append(repr(exc))
                status, spans = 400, []
            with receiver.lock:
                receiver.requests += 1
                receiver.spans.extend(spans)
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the exporter gave up waiting (its timeout, or its daemon stopping)

    with serving(QuietServer((host, 0), Handler)) as server:
        receiver.url = f"http://{host}:{server.server_address[1]}"
        yield receiver
