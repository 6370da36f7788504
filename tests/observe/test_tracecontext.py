"""Trace context parsing (W3C and B3) and the OTLP/JSON encoder, decoded by the official protos."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.observe.otlp import KIND_SERVER, STATUS_ERROR, Span, SpanQueue, encode_traces
from meshd.observe.tracecontext import (
    SpanContext,
    extract,
    parse_b3_single,
    parse_traceparent,
)
from tests.support.otlp_receiver import decode, spans_of

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def headers(**kv: str) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in kv.items()}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", SpanContext(TRACE, SPAN, True)),
        (f"00-{TRACE}-{SPAN}-00", SpanContext(TRACE, SPAN, False)),
        (f"00-{TRACE.upper()}-{SPAN}-01", SpanContext(TRACE, SPAN, True)),
        (f"01-{TRACE}-{SPAN}-01-future", SpanContext(TRACE, SPAN, True)),  # a later version: read as 00
        (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE}-{SPAN}-01", None),
        (f"00-{'0' * 32}-{SPAN}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),
        ("", None),
        ("garbage", None),
    ],
)
def test_traceparent(value: str, expected: SpanContext | None) -> None:
    assert parse_traceparent(value) == expected


def test_extract_prefers_traceparent_and_keeps_tracestate() -> None:
    h = headers(
        traceparent=f"00-{TRACE}-{SPAN}-01", tracestate="congo=t61rcWkgMzE", b3=f"{'1' * 32}-{'2' * 16}-1"
    )
    assert extract(h.get) == SpanContext(TRACE, SPAN, True, "congo=t61rcWkgMzE")


def test_tracestate_is_dropped_without_a_valid_traceparent() -> None:
    h = headers(traceparent="broken", tracestate="congo=t61rcWkgMzE")
    assert extract(h.get) is None


@pytest.mark.parametrize(
    ("h", "expected"),
    [
        (headers(b3=f"{TRACE}-{SPAN}-1"), SpanContext(TRACE, SPAN, True)),
        (headers(b3=f"{TRACE}-{SPAN}-0-{'3' * 16}"), SpanContext(TRACE, SPAN, False)),
        (headers(b3=f"{TRACE}-{SPAN}-d"), SpanContext(TRACE, SPAN, True)),
        (headers(b3=f"{TRACE}-{SPAN}"), SpanContext(TRACE, SPAN, None)),  # deferred: the local sampler
        (headers(b3=f"{TRACE[16:]}-{SPAN}-1"), SpanContext("0" * 16 + TRACE[16:], SPAN, True)),  # 64-bit id
        (headers(b3="0"), None),  # sampling only: nothing to continue
        (headers(b3=f"{TRACE}-{SPAN}-x"), None),
        (headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_sampled="1"), SpanContext(TRACE, SPAN, True)),
        (headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_sampled="0"), SpanContext(TRACE, SPAN, False)),
        (headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_flags="1"), SpanContext(TRACE, SPAN, True)),
        (headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN), SpanContext(TRACE, SPAN, None)),
        (headers(x_b3_traceid=TRACE), None),
        (headers(x_b3_traceid="zz", x_b3_spanid=SPAN), None),
    ],
)
def test_b3_accepted(h: dict[str, str], expected: SpanContext | None) -> None:
    assert extract(h.get) == expected


def test_b3_single_parser_alone() -> None:
    assert parse_b3_single(None) is None


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"]
        ),
        st.text(max_size=80),
    )
)
def test_extract_never_raises_and_gives_valid_ids(h: dict[str, str]) -> None:
    ctx = extract(h.get)
    if ctx is not None:
        assert len(ctx.trace_id) == 32 and int(ctx.trace_id, 16)
        assert len(ctx.span_id) == 16 and int(ctx.span_id, 16)
        assert parse_traceparent(ctx.traceparent) is not None


def span(**kw: object) -> Span:
    base: dict[str, object] = dict(
        trace_id=TRACE,
        span_id=SPAN,
        parent_span_id="",
        name="GET reviews.default",
        kind=KIND_SERVER,
        start_ns=1_700_000_000_000_000_000,
        end_ns=1_700_000_000_500_000_000,
        attributes={"http.status_code": 503, "response_flags": "UF", "sampled": True, "ratio": 0.5},
    )
    base.update(kw)
    return Span(**base)  # type: ignore[arg-type]


def test_encoding_is_otlp_json_as_the_official_protos_read_it() -> None:
    body = encode_traces(
        {"service.name": "wp"},
        ("meshd", "1.0"),
        [
            span(status=STATUS_ERROR, status_message="upstream failed", tracestate="a=b"),
            span(span_id="1" * 16, parent_span_id=SPAN),
        ],
    )
    raw = json.loads(body)
    first = raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert first["traceId"] == TRACE and first["spanId"] == SPAN  # hex, not base64
    assert first["startTimeUnixNano"] == "1700000000000000000" and first["kind"] == 2
    spans = spans_of(decode(body))  # unknown field names or bad ids fail here
    assert [s.service for s in spans] == ["wp", "wp"]
    assert spans[0].trace_id == TRACE and spans[0].parent_span_id == "" and spans[0].status == STATUS_ERROR
    assert spans[0].attributes == {
        "http.status_code": 503,
        "response_flags": "UF",
        "sampled": True,
        "ratio": 0.5,
    }
    assert spans[1].parent_span_id == SPAN and spans[1].end_ns - spans[1].start_ns == 500_000_000


def test_queue_is_bounded_and_counts_what_it_drops() -> None:
    q = SpanQueue(capacity=3)
    assert all(q.add(span(span_id=f"{i + 1:016x}")) for i in range(3))
    assert not q.add(span()) and q.dropped == 1
    assert [s.span_id for s in q.take(2)] == [f"{1:016x}", f"{2:016x}"]
    assert q.add(span()) and len(q) == 2


attribute_values = st.one_of(
    st.text(max_size=30),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=20), attribute_values, max_size=8),
    st.text(max_size=40),
    st.text(max_size=40),
)
def test_any_attribute_and_name_round_trip_through_the_official_protos(
    attrs: dict[str, object], name: str, message: str
) -> None:
    body = encode_traces(
        {"service.name": name},
        ("meshd", "x"),
        [span(name=name, attributes=attrs, status=STATUS_ERROR, status_message=message)],
    )
    [got] = spans_of(decode(body))
    assert got.name == name and got.service == name
    assert got.attributes == attrs


def test_a_float_json_cannot_write_is_sent_as_a_string() -> None:
    [got] = spans_of(decode(encode_traces({}, ("meshd", "x"), [span(attributes={"x": float("inf")})])))
    assert got.attributes == {"x": "inf"}


def test_spans_put_back_go_first_in_their_order() -> None:
    q = SpanQueue(capacity=10)
    for i in range(4):
        q.add(span(span_id=f"{i + 1:016x}"))
    batch = q.take(2)
    q.put_back(batch)
    assert [s.span_id for s in q.take(4)] == [f"{i + 1:016x}" for i in range(4)]
