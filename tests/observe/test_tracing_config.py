"""`[tracing]` in the config: off by default, checked with FILE:LINE, a restart key."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.config.load import load_config
from meshd.errors import ConfigError
from meshd.observe.tracecontext import SpanContext
from meshd.observe.tracing import CollectorUrl, Tracer


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
