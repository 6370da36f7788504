"""Trace export: spans begun and finished on the data path, batched and sent to an OTLP/HTTP collector.

Theory of operation: the data path calls `start`/`child` (ids and a sampling decision, no I/O) and
`finish` (builds the span and appends it to a bounded queue; never awaits). One exporter task owned by
the daemon takes batches from the queue and POSTs them (otlp.encode_traces) to `<otlp>/v1/traces`,
one request at a time, each bounded by `tracing.timeout`. A collector that is down or slow therefore
costs a full queue, never a slower request: spans beyond `tracing.queue_size` are dropped and counted
(`meshd_tracing_spans_dropped_total{reason="queue_full"}`), a failed export counts its batch
(`reason="export_failed"`).

Sampling is parent-based: a caller's decision (the `traceparent` sampled flag, B3's sampled state) is
kept; a new trace is recorded with probability `tracing.sampling`. With tracing off (`tracing.otlp`
empty) `start` returns None and nothing here costs anything.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from meshd import __version__
from meshd.config.model import TracingConfig
from meshd.observe.metrics import Metrics
from meshd.observe.otlp import (
    CONTENT_TYPE,
    STATUS_UNSET,
    TRACES_PATH,
    AttributeValue,
    Span,
    SpanQueue,
    request_body,
    span_text,
)
from meshd.observe.tracecontext import (
    SpanContext,
    SpanStart,
    new_span_id,
    new_trace_id,
    random_fraction,
    unix_nanos,
)

log = logging.getLogger("meshd.tracing")

SCOPE = ("meshd", __version__)
ENCODE_CHUNK = 32  # spans encoded between two checkpoints of the exporter task


class ExportError(Exception):
    """One export request failed; the message says why (refused, timed out, answered non-2xx)."""


@dataclass(frozen=True)
class CollectorUrl:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> CollectorUrl:
        """`http://host:4318` -> POST to /v1/traces; a URL already ending in /v1/traces is kept."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
        path = parts.path.rstrip("/")
        if not path.endswith(TRACES_PATH):
            path += TRACES_PATH
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), path)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


async def post(url: CollectorUrl, body: bytes) -> int:
    """POST `body` (OTLP JSON) and return the status code. One connection per export: batches are
    seconds apart, and a fresh connection never meets a collector's idle close half-way."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(url.host, url.port)
    if url.scheme == "https":
        tls = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=url.host)
        await tls.do_handshake()
        stream = tls
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="POST",
            target=url.path,
            headers=[
                ("host", url.authority),
                ("content-type", CONTENT_TYPE),
                ("content-length", str(len(body))),
                ("user-agent", f"meshd/{__version__}"),
            ],
        )
        await stream.send_all(
            conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        )
        status: int | None = None
        while True:  # the whole answer (an OTLP partial-success body is small), then close
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage) and status is not None:
                return status
            elif isinstance(event, h11.ConnectionClosed):
                if status is not None:
                    return status
                raise ExportError("the collector closed the connection without an answer")


class Tracer:
    """Span ids and sampling for the data path, and the exporter task (`run`)."""

    def __init__(
        self, config: TracingConfig, metrics: Metrics | None, resource: Mapping[str, AttributeValue]
    ) -> None:
        self.config = config
        self.enabled = bool(config.otlp)
        self.connection_spans = self.enabled and config.connection_spans
        self.url = CollectorUrl.parse(config.otlp) if self.enabled else None
        self.metrics = metrics
        self.resource = dict(resource)
        self.queue = SpanQueue(config.queue_size)
        self.exported = 0
        self.failed_exports = 0
        self.last_error: str | None = None
        self._wake = trio.Event()
        self._sampling = config.sampling

    @classmethod
    def disabled(cls) -> Tracer:
        return cls(TracingConfig(), None, {})

    # ---- the data path: no I/O, no await ----------------------------------------------------------
    def _sample(self) -> bool:
        return self._sampling >= 1.0 or (self._sampling > 0.0 and random_fraction() < self._sampling)

    def start(self, parent: SpanContext | None) -> SpanStart | None:
        """A new span under `parent` (its trace continued; None: a new trace); None if tracing is off."""
        if not self.enabled:
            return None
        if parent is None:
            ctx = SpanContext(new_trace_id(), new_span_id(), self._sample())
            return SpanStart(ctx, "", unix_nanos())
        sampled = parent.sampled if parent.sampled is not None else self._sample()
        ctx = SpanContext(parent.trace_id, new_span_id(), sampled, parent.tracestate)
        return SpanStart(ctx, parent.span_id, unix_nanos())

    def child(self, parent: SpanStart) -> SpanStart:
        ctx = parent.context
        return SpanStart(
            SpanContext(ctx.trace_id, new_span_id(), ctx.sampled, ctx.tracestate), ctx.span_id, unix_nanos()
        )

    def finish(
        self,
        start: SpanStart,
        name: str,
        kind: int,
        attributes: Mapping[str, AttributeValue],
        status: int = STATUS_UNSET,
        message: str = "",
    ) -> None:
        """The span ends now: queue it for export (if sampled), or count it dropped if the queue is full."""
        ctx = start.context
        if not ctx.sampled:
            return
        span = Span(
            ctx.trace_id,
            ctx.span_id,
            start.parent_span_id,
            name,
            kind,
            start.start_ns,
            unix_nanos(),
            attributes,
            status,
            message,
            ctx.tracestate,
        )
        if not self.queue.add(span):
            if self.metrics is not None:
                self.metrics.spans_dropped.labels("queue_full").inc()
        elif len(self.queue) >= self.config.batch_size:
            self._wake.set()

    # ---- the exporter -----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Export until cancelled; then one last, short flush of what is queued."""
        task_status.started()
        if self.url is None:
            return
        log.info(
            "exporting traces", extra={"otlp": f"{self.url.scheme}://{self.url.authority}{self.url.path}"}
        )
        try:
            while True:
                with trio.move_on_after(self.config.interval.total_seconds()):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self.flush()
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(min(2.0, self.config.timeout.total_seconds())),
            ):
                await self.flush()

    async def flush(self) -> None:
        """Export every queued span, a batch at a time."""
        while self.queue:
            batch = self.queue.take(self.config.batch_size)
            sent = False  # _export returns whatever the collector did; only a cancellation escapes it
            try:
                await self._export(batch)
                sent = True
            finally:
                if (
                    not sent
                ):  # shutting down mid-export (Cancelled, maybe in a group): the final flush sends them
                    self.queue.put_back(batch)

    async def _export(self, batch: list[Span]) -> None:
        assert self.url is not None
        texts = []
        for i, span in enumerate(batch):  # ~16 us a span: let requests run between every few dozen
            texts.append(span_text(span))
            if i % ENCODE_CHUNK == ENCODE_CHUNK - 1:
                await trio.lowlevel.checkpoint()
        body = request_body(self.resource, SCOPE, texts)
        try:
            with trio.fail_after(self.config.timeout.total_seconds()):
                status = await post(self.url, body)
            if not 200 <= status < 300:
                raise ExportError(f"the collector answered {status}")
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError, ExportError) as exc:
            why = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc) or type(exc).__name__
            self.failed_exports += 1
            if self.metrics is not None:
                self.metrics.spans_dropped.labels("export_failed").inc(len(batch))
            if self.last_error is None:  # logged when it starts failing, not for every batch
                log.warning(
                    "trace export to %s failed, spans are dropped until it answers: %s",
                    self.url.authority,
                    why,
                )
            self.last_error = why
            return
        if self.last_error is not None:
            log.info("trace export to %s works again", self.url.authority)
        self.last_error = None
        self.exported += len(batch)
        if self.metrics is not None:
            self.metrics.spans_exported.inc(len(batch))

    def statistics(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "otlp": self.config.otlp or None,
            "queued": len(self.queue),
            "exported": self.exported,
            "dropped_queue_full": self.queue.dropped,
            "failed_exports": self.failed_exports,
            "last_error": self.last_error,
        }
