"""OTLP/HTTP with the JSON encoding, as the OpenTelemetry protocol specification defines it: the
body of `POST /v1/traces` (an `ExportTraceServiceRequest`), and the bounded queue spans wait in.

Must never know: sockets, trio, HTTP. `encode_traces` returns bytes; `SpanQueue` is plain data.

The JSON encoding is protobuf's JSON mapping with the spec's own rules, which a generic protobuf JSON
writer gets wrong:
- field names are lowerCamelCase (`traceId`, `startTimeUnixNano`, `resourceSpans`);
- `traceId`, `spanId`, `parentSpanId` are hex strings (not base64, protobuf's default for bytes);
- enums (`kind`, `status.code`) are integers; 64-bit integers (`*UnixNano`, `intValue`) are strings.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# opentelemetry.proto.trace.v1.Span.SpanKind
KIND_INTERNAL = 1
KIND_SERVER = 2
KIND_CLIENT = 3
# opentelemetry.proto.trace.v1.Status.StatusCode
STATUS_UNSET = 0
STATUS_OK = 1
STATUS_ERROR = 2

TRACES_PATH = "/v1/traces"
CONTENT_TYPE = "application/json"

AttributeValue = str | bool | int | float


@dataclass(frozen=True, slots=True)
class Span:
    """A finished span, ready to export."""

    trace_id: str  # 32 lower-case hex
    span_id: str  # 16 lower-case hex
    parent_span_id: str  # 16 hex, "" for a root span
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    status: int = STATUS_UNSET
    status_message: str = ""
    tracestate: str = ""


def any_value(value: AttributeValue) -> dict[str, object]:
    """An `AnyValue`: bool before int (a bool is an int in Python); int64 as a string."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": value}


def key_values(attributes: Mapping[str, AttributeValue]) -> list[dict[str, object]]:
    return [{"key": k, "value": any_value(v)} for k, v in attributes.items()]


def span_json(span: Span) -> dict[str, object]:
    out: dict[str, object] = {
        "traceId": span.trace_id,
        "spanId": span.span_id,
        "name": span.name,
        "kind": span.kind,
        "startTimeUnixNano": str(span.start_ns),
        "endTimeUnixNano": str(max(span.end_ns, span.start_ns)),
        "attributes": key_values(span.attributes),
    }
    if span.parent_span_id:
        out["parentSpanId"] = span.parent_span_id
    if span.tracestate:
        out["traceState"] = span.tracestate
    if span.status != STATUS_UNSET:
        status: dict[str, object] = {"code": span.status}
        if span.status_message:
            status["message"] = span.status_message
        out["status"] = status
    return out


def encode_traces(
    resource: Mapping[str, AttributeValue], scope: tuple[str, str], spans: Iterable[Span]
) -> bytes:
    """The `ExportTraceServiceRequest` for spans of one resource (this daemon), as JSON bytes."""
    name, version = scope
    request = {
        "resourceSpans": [
            {
                "resource": {"attributes": key_values(resource)},
                "scopeSpans": [
                    {"scope": {"name": name, "version": version}, "spans": [span_json(s) for s in spans]}
                ],
            }
        ]
    }
    return json.dumps(request, separators=(",", ":")).encode()


@dataclass
class SpanQueue:
    """Finished spans waiting for export. Bounded: a full queue drops the new span and counts it, so a
    collector that is down or slow costs memory up to `capacity` spans and never blocks the data path."""

    capacity: int
    spans: deque[Span] = field(default_factory=deque)
    dropped: int = 0

    def add(self, span: Span) -> bool:
        """Queue `span`; False (and counted) if the queue is full."""
        if len(self.spans) >= self.capacity:
            self.dropped += 1
            return False
        self.spans.append(span)
        return True

    def take(self, limit: int) -> list[Span]:
        """Up to `limit` spans, oldest first."""
        n = min(limit, len(self.spans))
        return [self.spans.popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self.spans)
