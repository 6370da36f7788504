"""`[tracing]` in the config: off by default, checked with FILE:LINE, a restart key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import trio

from meshd.config.load import load_config
from meshd.config.model import TracingConfig
from meshd.errors import ConfigError
from meshd.observe.otlp import KIND_SERVER
from meshd.observe.tracecontext import SpanContext
from meshd.observe.tracing import CollectorUrl, Tracer
from tests.support.otlp_receiver import otlp_receiver
from tests.support.procs import unique_loopback


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "meshd.toml"
    path.write_text(f'node_name = "n"\n[identity]\nca_dir = "{tmp_path}"\n{body}')
    return path


def test_off_by_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    tracer = Tracer(config.tracing, None, {})
    assert not tracer.enabled and not tracer.connection_spans and tracer.start(None) is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            '[tracing]\notlp = "127.0.0.1:4318"\n',
            "meshd.toml:5: tracing.otlp '127.0.0.1:4318' is not an http(s) URL",
        ),
        ("[tracing]\nsampling = 1.5\n", "meshd.toml:5: tracing.sampling 1.5 is not within 0.0-1.0"),
        ("[tracing]\nqueue_size = 0\n", "meshd.toml:5: tracing.queue_size must be at least 1"),
    ],
)
def test_mistakes_name_their_line(tmp_path: Path, body: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, body))
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:4318", CollectorUrl("http", "127.0.0.1", 4318, "/v1/traces")),
        ("http://collector:4318/", CollectorUrl("http", "collector", 4318, "/v1/traces")),
        (
            "https://tempo.example/otlp/v1/traces",
            CollectorUrl("https", "tempo.example", 443, "/otlp/v1/traces"),
        ),
        ("http://[::1]:4318", CollectorUrl("http", "::1", 4318, "/v1/traces")),
    ],
)
def test_collector_url(url: str, expected: CollectorUrl) -> None:
    assert CollectorUrl.parse(url) == expected


def test_sampling_zero_records_nothing_new_but_keeps_a_callers_decision(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[tracing]\notlp = "http://127.0.0.1:4318"\nsampling = 0.0\n'))
    tracer = Tracer(config.tracing, None, {})
    assert not any(s is not None and s.context.sampled for s in (tracer.start(None) for _ in range(100)))

    child = tracer.start(SpanContext("1" * 32, "2" * 16, True))
    assert child is not None and child.context.sampled and child.parent_span_id == "2" * 16


async def test_a_shutdown_during_an_export_still_sends_that_batch() -> None:
    with otlp_receiver(unique_loopback(), delay=0.3) as rx:
        config = TracingConfig(otlp=rx.url, interval=timedelta(milliseconds=20), timeout=timedelta(seconds=5))
        tracer = Tracer(config, None, {"service.name": "t"})
        async with trio.open_nursery() as nursery:
            await nursery.start(tracer.run)
            for _ in range(3):
                start = tracer.start(None)
                assert start is not None
                tracer.finish(start, "s", KIND_SERVER, {})
            with trio.fail_after(5):
                while tracer.queue:  # taken by the exporter: its POST is under way (0.3 s)
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()  # shutdown now: the final flush sends them again
        assert tracer.exported == 3 and not tracer.queue
        with trio.fail_after(5):
            while len({s.span_id for s in rx.snapshot()}) < 3:
                await trio.sleep(0.05)
