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
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

_str = json.encoder.encode_basestring_ascii  # a JSON string literal, quotes included (C)

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


def _any_value(value: AttributeValue) -> str:
    """An `AnyValue` as JSON text: bool before int (a bool is an int in Python); int64 as a string; a
    float that JSON cannot write (inf, nan) as a string."""
    if isinstance(value, bool):
        return '{"boolValue":true}' if value else '{"boolValue":false}'
    if isinstance(value, int):
        return f'{{"intValue":"{value}"}}'
    if isinstance(value, float):
        return f'{{"doubleValue":{value!r}}}' if math.isfinite(value) else f'{{"stringValue":"{value}"}}'
    return f'{{"stringValue":{_str(value)}}}'


def _key_values(attributes: Mapping[str, AttributeValue]) -> str:
    return ",".join(f'{{"key":{_str(k)},"value":{_any_value(v)}}}' for k, v in attributes.items())


def span_text(span: Span) -> str:
    """One span as JSON text. Written by hand (the C string escaper for every string): building dicts
    for json.dumps cost twice as much, on the daemon's only thread."""
    parts = [
        f'{{"traceId":"{span.trace_id}","spanId":"{span.span_id}"',
        f',"parentSpanId":"{span.parent_span_id}"' if span.parent_span_id else "",
        f',"traceState":{_str(span.tracestate)}' if span.tracestate else "",
        f',"name":{_str(span.name)},"kind":{span.kind}',
        f',"startTimeUnixNano":"{span.start_ns}","endTimeUnixNano":"{max(span.end_ns, span.start_ns)}"',
        f',"attributes":[{_key_values(span.attributes)}]',
    ]
    if span.status != STATUS_UNSET:
        message = f',"message":{_str(span.status_message)}' if span.status_message else ""
        parts.append(f',"status":{{"code":{span.status}{message}}}')
    parts.append("}")
    return "".join(parts)


def request_body(
    resource: Mapping[str, AttributeValue], scope: tuple[str, str], spans: Iterable[str]
) -> bytes:
    """The `ExportTraceServiceRequest` around spans already written (`span_text`), as JSON bytes."""
    name, version = scope
    return (
        f'{{"resourceSpans":[{{"resource":{{"attributes":[{_key_values(resource)}]}},'
        f'"scopeSpans":[{{"scope":{{"name":{_str(name)},"version":{_str(version)}}},'
        f'"spans":[{",".join(spans)}]}}]}}]}}'
    ).encode()


def encode_traces(
    resource: Mapping[str, AttributeValue], scope: tuple[str, str], spans: Iterable[Span]
) -> bytes:
    """The `ExportTraceServiceRequest` for spans of one resource (this daemon), as JSON bytes."""
    return request_body(resource, scope, (span_text(s) for s in spans))


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

    def put_back(self, spans: list[Span]) -> None:
        """Spans taken but not sent (an export cancelled by shutdown) go back to the front, in order."""
        self.spans.extendleft(reversed(spans))

    def take(self, limit: int) -> list[Span]:
        """Up to `limit` spans, oldest first."""
        n = min(limit, len(self.spans))
        return [self.spans.popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self.spans)
