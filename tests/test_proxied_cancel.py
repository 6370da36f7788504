"""A proxied connection cancelled midway (the HBONE connection carrying its tunnel ended: a link
cancels its handlers when it finishes; or meshd is stopping) is still counted closed and logged."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from meshd.dataplane.proxied import proxied
from meshd.observe.accesslog import ConnectionRecord, ConnectionTelemetry
from meshd.observe.metrics import Metrics


async def test_a_cancelled_connection_is_logged_with_what_it_carried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    inflight: list[int] = []
    state = SimpleNamespace(
        telemetry=ConnectionTelemetry(metrics, access_log=True), track_inflight=inflight.append
    )
    client, client_far = trio.testing.memory_stream_pair()
    upstream, upstream_far = trio.testing.memory_stream_pair()
    rec = ConnectionRecord(
        reporter="source", src="10.0.1.11:40000", dst="echo.default.svc.cluster.local:7000"
    )
    caplog.set_level(logging.INFO, logger="meshd.access")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxied, state, rec, client, upstream)  # type: ignore[arg-type]
            await client_far.send_all(b"hello")
            assert await upstream_far.receive_some(5) == b"hello"
            scope.cancel()  # as the link's nursery is cancelled when its connection ends
    assert inflight == [1, -1]
    [line] = [r for r in caplog.records if r.getMessage().startswith("connection")]
    assert line.getMessage() == "connection failed"
    assert line.__dict__["bytes_recv"] == 5 and line.__dict__["bytes_sent"] == 0
    assert "cancelled (its HBONE connection ended" in line.__dict__["error"]
    assert metrics.tcp_closed.labels(*rec.labels())._value.get() == 1
