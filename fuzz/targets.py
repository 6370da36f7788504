"""Fuzz targets: one per sans-I/O core or parser, each a Hypothesis strategy plus a check.

A check feeds one generated input to meshd's code and asserts what must hold for *any* input: only the
documented error type escapes (RemoteProtocolError, ConfigError, CatalogError, TxtError, the HTTP/1.1
parser's BadMessage; the DNS answer function raises nothing), and what comes out is well formed.

The same targets run twice: bounded in CI (`tests/reliability/test_fuzz_*.py`) and with a time budget
from `make fuzz` (`fuzz/run.py`, Hypothesis batches or atheris driving Hypothesis' `fuzz_one_input`).
Every crash either run finds becomes an `@example` (or an explicit test) in `tests/reliability/`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import strategies as st

from meshd.capture.dns import decide, formerr, parse, to_wire
from meshd.config.load import parse_overrides
from meshd.config.model import Config, GatewayConfig
from meshd.config.schema import leaf_keys, load_document
from meshd.dataplane.proxied import Refused
from meshd.discovery import etcd_wire
from meshd.discovery.catalog import (
    CatalogError,
    NodeCatalog,
    PeerRecord,
    ServiceEntry,
    ServicePortEntry,
    merge,
)
from meshd.discovery.mdns import TxtError, parse_txt
from meshd.discovery.networks import decode_network_catalog
from meshd.discovery.vip import allocate
from meshd.errors import ConfigError
from meshd.gateway.admission import admit
from meshd.hbone import events as ev
from meshd.hbone.capsule import (
    MAX_UDP_PAYLOAD,
    CapsuleDecoder,
    CapsuleError,
    encode_capsule,
    encode_datagram,
    encode_varint,
)
from meshd.hbone.connection import HboneConnection, Role
from meshd.hbone.errors import RemoteProtocolError
from meshd.hbone.target import HostnameTarget, is_hostname, parse_connect_target
from meshd.identity.spiffe import SpiffeId
from meshd.plugins import wasm_abi
from meshd.plugins.filters import Headers
from meshd.policy.load import load_policy_dir
from meshd.waypoint.http1 import (
    END,
    HOP_BY_HOP,
    BadMessage,
    Head,
    RequestParser,
    forwardable,
    response_head,
    trace_headers,
)

REPO = Path(__file__).resolve().parent.parent
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Target:
    """A named fuzz target: `check(value)` for values drawn from `strategy`."""

    name: str
    surface: str  # the row of docs/reliability.md it counts towards
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    tried: int = 0

    def run(self, value: Any) -> None:
        self.tried += 1
        self.check(value)


def _cuts(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


# ---- HBONE / HTTP/2 frames ----------------------------------------------------------------------

_STREAM_IDS = st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1])
_AUTHORITIES = st.one_of(
    st.sampled_from(["10.0.0.1:80", "[fd00::1]:8080", "10.0.0.1", "echo:80", "", "1.2.3.4:0"]),
    # service hostnames as ztunnel's double HBONE names them, and near misses (meshd/hbone/target.py)
    st.sampled_from(
        [
            "echo.default.svc.cluster.local:7000",
            "ECHO.Default.svc.cluster.local:80",
            "echo.default.svc.cluster.local:0",
            "echo.default.svc.cluster.local:+80",
            "-echo.default:80",
            "echo..default:80",
            "10.0.0.300:80",
            "a" * 64 + ".x:80",
            "echo.default.svc.cluster.local.:80",
            "[echo]:80",
        ]
    ),
    st.tuples(st.text(max_size=30), st.text("0123456789+-", max_size=6)).map(lambda t: f"{t[0]}:{t[1]}"),
)
_UDP_PATHS = st.one_of(
    st.sampled_from(
        [
            "/.well-known/masque/udp/10.0.0.1/53/",
            "/.well-known/masque/udp/fd00%3A%3A1/53/",
            "/.well-known/masque/udp/name/53/",
            "/.well-known/masque/udp/10.0.0.1/99999/",
            "/.well-known/masque/udp//",
            "/",
        ]
    ),
    st.text(max_size=40).map(lambda t: "/.well-known/masque/udp/" + t),
)
_HEADER_NAMES = st.sampled_from(
    [
        ":method",
        ":authority",
        ":path",
        ":scheme",
        ":status",
        ":protocol",
        "forwarded",
        "te",
        "connection",
        "content-length",
        "baggage",
        "x-a",
        "X-Upper",
        "",
    ]
)
_HEADER_VALUES = st.one_of(
    st.sampled_from(["CONNECT", "GET", "200", "401", "503", "abc", "/", "https", "trailers", "-1"]),
    _AUTHORITIES,
    st.text(max_size=20),
)


@st.composite
def _header_block(draw: st.DrawFn) -> list[tuple[str, str]]:
    kind = draw(st.sampled_from(["connect", "connect-udp", "get", "response", "random"]))
    if kind == "connect":
        hdrs = [(":method", "CONNECT"), (":authority", draw(_AUTHORITIES))]
    elif kind == "connect-udp":
        hdrs = [
            (":method", "CONNECT"),
            (":protocol", draw(st.sampled_from(["connect-udp", "websocket", ""]))),
            (":scheme", "https"),
            (":authority", draw(_AUTHORITIES)),
            (":path", draw(_UDP_PATHS)),
        ]
    elif kind == "get":
        hdrs = [(":method", "GET"), (":scheme", "https"), (":authority", "n"), (":path", "/catalog")]
    elif kind == "response":
        hdrs = [(":status", draw(st.sampled_from(["200", "100", "401", "503", "abc", "999"])))]
    else:
        hdrs = []
    hdrs += draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=4))
    return hdrs


_FRAME_SPECS = st.one_of(
    st.tuples(
        st.just("headers"),
        _STREAM_IDS,
        _header_block(),
        st.sets(st.sampled_from(["END_STREAM", "END_HEADERS", "PRIORITY"])),
    ),
    st.tuples(st.just("continuation"), _STREAM_IDS, _header_block(), st.sets(st.just("END_HEADERS"))),
    st.tuples(
        st.just("data"),
        _STREAM_IDS,
        st.binary(max_size=3000),
        st.sets(st.sampled_from(["END_STREAM", "PADDED"])),
    ),
    st.tuples(st.just("rst"), _STREAM_IDS, st.integers(0, 2**32 - 1), st.just(set())),
    st.tuples(
        st.just("settings"),
        st.just(0),
        st.dictionaries(st.integers(1, 10), st.integers(0, 2**32 - 1), max_size=4),
        st.sets(st.just("ACK")),
    ),
    st.tuples(
        st.just("ping"), st.sampled_from([0, 1]), st.binary(min_size=8, max_size=8), st.sets(st.just("ACK"))
    ),
    st.tuples(
        st.just("goaway"),
        st.just(0),
        st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 13)),
        st.just(set()),
    ),
    st.tuples(st.just("window"), _STREAM_IDS, st.integers(0, 2**31 - 1), st.just(set())),
    st.tuples(st.just("priority"), _STREAM_IDS, st.integers(0, 7), st.just(set())),
    st.tuples(
        st.just("raw"),
        _STREAM_IDS,
        st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=64)),
        st.just(set()),
    ),
)


def _serialize(specs: list[tuple[str, int, Any, set[str]]]) -> bytes:
    encoder = Encoder()  # one HPACK context per connection, as a real peer has
    out = bytearray()
    for kind, sid, arg, flags in specs:
        if kind in ("headers", "continuation"):
            block = encoder.encode([(n.encode(), v.encode("utf-8", "surrogatepass")) for n, v in arg])
            frame: Any = (HeadersFrame if kind == "headers" else ContinuationFrame)(1, data=block)
        elif kind == "data":
            frame = DataFrame(1, data=arg, pad_length=3 if "PADDED" in flags else 0)
        elif kind == "rst":
            frame = RstStreamFrame(1, error_code=arg)
        elif kind == "settings":
            frame = SettingsFrame(0, settings={} if "ACK" in flags else arg)
        elif kind == "ping":
            frame = PingFrame(0, opaque_data=arg)
        elif kind == "goaway":
            frame = GoAwayFrame(0, last_stream_id=arg[0], error_code=arg[1])
        elif kind == "window":
            frame = WindowUpdateFrame(0, window_increment=arg)
        elif kind == "priority":
            frame = PriorityFrame(1, depends_on=arg, stream_weight=15)
        else:  # any type (unknown ones too) and flags, hand-built
            ftype, fflags, payload = arg
            out += len(payload).to_bytes(3, "big") + bytes([ftype, fflags]) + sid.to_bytes(4, "big") + payload
            continue
        for flag in flags:
            frame.flags.add(flag)
        frame.stream_id = sid  # after construction: hyperframe refuses wrong ids, a hostile peer does not
        out += frame.serialize()
    return bytes(out)


HBONE_INPUT = st.tuples(
    st.sampled_from([Role.SERVER, Role.CLIENT]),
    st.lists(_FRAME_SPECS, max_size=12),
    st.binary(max_size=40),  # garbage after the frames
    st.lists(st.integers(0, 10_000), max_size=6),  # where the transport splits the bytes
)


def _react(conn: HboneConnection, events: list[ev.Event]) -> None:
    """What a well-behaved app does with each event (so the fuzzer reaches the app-facing paths)."""
    for e in events:
        if isinstance(e, ev.UdpTunnelRequested):
            if conn.role is Role.CLIENT or not conn.can_send(e.stream_id):
                conn.release_stream(e.stream_id)
            else:
                conn.accept(e.stream_id, [("capsule-protocol", "?1")])
                if conn.send_window(e.stream_id) >= 8:
                    conn.send_data(e.stream_id, encode_datagram(b"hello"))
        elif isinstance(e, ev.TunnelRequested | ev.RequestReceived) and conn.role is Role.CLIENT:
            conn.release_stream(e.stream_id)  # a server-opened stream: the client link drops it so
        elif isinstance(e, ev.TunnelRequested | ev.RequestReceived) and not conn.can_send(e.stream_id):
            conn.release_stream(e.stream_id)  # reset later in the same batch (as ServerReply checks)
        elif isinstance(e, ev.TunnelRequested):
            if e.stream_id % 4 == 1:
                conn.accept(e.stream_id)
                if conn.send_window(e.stream_id) >= 5:
                    conn.send_data(e.stream_id, b"hello")
            else:
                conn.refuse(e.stream_id, 503, "fuzz")
                conn.release_stream(e.stream_id)
        elif isinstance(e, ev.RequestReceived):
            conn.send_response(e.stream_id, 200, end_stream=True)
        elif isinstance(e, ev.DataReceived):
            conn.acknowledge(e.stream_id, len(e.data))
        elif isinstance(e, ev.StreamEnded) and conn.can_send(e.stream_id):
            conn.end_stream(e.stream_id)
        elif isinstance(e, ev.StreamReset):
            conn.release_stream(e.stream_id)


def _check_targets(events: list[ev.Event]) -> None:
    """A CONNECT's typed target is what its :authority says, and prints back to an equal one."""
    for e in events:
        if isinstance(e, ev.TunnelRequested):
            assert parse_connect_target(e.authority) == e.target
            assert parse_connect_target(str(e.target)) == e.target
            if isinstance(e.target, HostnameTarget):
                assert is_hostname(e.target.hostname) and e.target.hostname == e.target.hostname.lower()
                assert 1 <= e.target.port <= 65535


def check_hbone(value: tuple[Role, list[Any], bytes, list[int]]) -> None:
    role, specs, garbage, cuts = value
    conn = HboneConnection(role)
    if role is Role.CLIENT:
        conn.open_tunnel("10.0.0.1:80")
        conn.open_tunnel("10.0.0.2:80")
        conn.send_request("GET", "n", "/catalog")
        settings = _serialize([("settings", 0, {8: 1}, set())])  # SETTINGS_ENABLE_CONNECT_PROTOCOL
        conn.receive_data(settings)
        conn.open_udp_tunnel("10.0.0.3", 53)  # stream 7
        conn.open_tunnel("echo.default.svc.cluster.local:7000")  # stream 9: a service hostname
        wire = _serialize(specs) + garbage
    else:
        wire = PREFACE + _serialize([("settings", 0, {}, set())]) + _serialize(specs) + garbage
    conn.data_to_send()
    limit = conn.settings.max_concurrent_streams
    for chunk in _cuts(wire, cuts):
        try:
            events = conn.receive_data(chunk)
        except RemoteProtocolError:
            assert conn.closed
            assert conn.receive_data(b"\x00" * 9) == []
            conn.data_to_send()
            return
        _check_targets(events)
        if not conn.closed:
            _react(conn, events)
        assert conn.active_stream_count <= limit + 4
        conn.data_to_send()


HBONE = Target("hbone_frames", "HBONE / HTTP/2 frames (sans-I/O core, both roles)", HBONE_INPUT, check_hbone)


# ---- HTTP/1.1 in the waypoint --------------------------------------------------------------------

_METHODS = st.sampled_from(["GET", "POST", "HEAD", "CONNECT", "OPTIONS", "G T", "", "PUT"])
_H1_HEADERS = st.sampled_from(
    [
        "Host: a",
        "Content-Length: 5",
        "Content-Length: -1",
        "Content-Length: 99999999999999999999",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip, chunked",
        "Connection: close, x-drop",
        "Connection: keep-alive",
        "X-Drop: 1",
        "traceparent: 00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "traceparent: 00-" + "0" * 32 + "-" + "0" * 16 + "-01",
        "traceparent: garbage",
        "x-request-id: r1",
        "Expect: 100-continue",
        "Upgrade: h2c",
        " folded",
        "Bad Header: x",
        "x:\x00",
        "Te: trailers",
    ]
)


@st.composite
def _h1_stream(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        method = draw(_METHODS)
        target = draw(st.sampled_from(["/", "/api/x?q=1", "*", "http://h/p", "", "/%00", "/a b"]))
        version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 "]))
        headers = draw(st.lists(_H1_HEADERS, max_size=6))
        body = draw(st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"0\r\n\r\n"]))
        eol = draw(st.sampled_from(["\r\n", "\n"]))
        out += (f"{method} {target} {version}{eol}" + "".join(h + eol for h in headers) + eol).encode()
        out += body
    return out


H1_INPUT = st.tuples(
    st.one_of(_h1_stream(), st.binary(max_size=300)),
    st.lists(st.integers(0, 2000), max_size=6),
)


def check_http1(value: tuple[bytes, list[int]]) -> None:
    data, cuts = value
    parser = RequestParser()
    try:
        for chunk in _cuts(data, cuts):
            for event in parser.feed(chunk):
                if isinstance(event, Head):
                    headers = Headers.adopt(event.headers)
                    kept = forwardable(headers)
                    assert not {k for k, _ in kept} & HOP_BY_HOP
                    trace = trace_headers(headers, new_id=lambda: "fixed")
                    assert len(trace) == 32 and int(trace, 16) != 0
                    assert headers.get("x-request-id")
                    assert event.method and event.version in ("1.0", "1.1")
                elif event is END:
                    response_head(200, [("content-length", "0")])  # as the waypoint answers
                else:
                    assert isinstance(event, bytes)
    except BadMessage as exc:
        assert exc.status in (400, 405, 431, 505)


HTTP1 = Target("http1", "HTTP/1.1 requests (waypoint: httptools + header rules)", H1_INPUT, check_http1)


# ---- config and policy TOML -----------------------------------------------------------------------

_SCALARS = st.sampled_from(
    [
        '""',
        '"x"',
        "0",
        "-1",
        "65536",
        "99999999999999999999",
        "1.5",
        "true",
        "[]",
        "[1, 2]",
        '["a", 3]',
        "{}",
        "{ a = 1 }",
        '"1s"',
        '"-1s"',
        '"1e9h"',
        '"0s"',
        '"10.0.0.1:80"',
        '"[::1]:15008"',
        '"::"',
        '"*"',
        '"spiffe://x/ns/a/sa/b"',
        '"home.arpa/ns/a/sa/b"',
        '"\\u0000"',
        '"ALLOW"',
        '"DENY"',
        '"STRICT"',
        "1979-05-27T07:32:00Z",
        "inf",
        "nan",
        '"/nonexistent"',
        '"echo"',
        '"10.0.0.0/8"',
        '"http"',
    ]
)
_CONFIG_KEYS = sorted(leaf_keys(Config))
_POLICY_KEYS = [
    "name",
    "namespace",
    "workloads",
    "action",
    "rules",
    "from",
    "to",
    "when",
    "principals",
    "not_principals",
    "namespaces",
    "ip_blocks",
    "ports",
    "methods",
    "paths",
    "hosts",
    "key",
    "values",
    "mode",
    "service",
    "match",
    "backends",
    "weight",
    "timeout",
    "retries",
    "filters",
    "settings",
    "path",
    "prefix",
    "exact",
    "regex",
    "subset",
    "headers",
    "port_level_mtls",
]
_TABLES = [
    "[listen]",
    "[identity]",
    "[discovery]",
    "[policy]",
    "[dns]",
    "[[workload]]",
    "[[service]]",
    "[[upstream]]",
    "[[authorization]]",
    "[[authorization.rules]]",
    "[[peer_authentication]]",
    "[[route]]",
    "[capture]",
    "[[route.match]]",
    "[log]",
    "[[",
]


def _seed_lines(*globs: str) -> list[str]:
    lines: list[str] = []
    for pattern in globs:
        for path in sorted(REPO.glob(pattern)):
            lines += [line for line in path.read_text().splitlines() if line.strip()]
    return lines or ['trust_domain = "home.arpa"']


@st.composite
def _toml_doc(draw: st.DrawFn, seeds: list[str], keys: list[str]) -> str:
    fragments = st.one_of(
        st.sampled_from(seeds),
        st.sampled_from(_TABLES),
        st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(keys), _SCALARS),
        st.text(max_size=30),
    )
    return "\n".join(draw(st.lists(fragments, max_size=25)))


_CONFIG_SEEDS = _seed_lines("configs/*.toml", "configs/homelab/*.toml")
_POLICY_SEEDS = _seed_lines("configs/policy.d/*.toml", "configs/policy-examples/*.toml")
_BASE = Path(tempfile.gettempdir())

CONFIG_INPUT = st.tuples(
    _toml_doc(_CONFIG_SEEDS, _CONFIG_KEYS),
    st.lists(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_CONFIG_KEYS), st.text(max_size=12)), max_size=2
    ),
)


def check_config(value: tuple[str, list[str]]) -> None:
    text, overrides = value
    try:
        typed = parse_overrides(overrides)
        load_document(Config, text, "fuzz.toml", _BASE, overrides=typed)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must name at least one problem"
        str(exc)


CONFIG = Target("config", "config TOML (+ KEY=VALUE overrides)", CONFIG_INPUT, check_config)

POLICY_INPUT = st.tuples(_toml_doc(_POLICY_SEEDS, _POLICY_KEYS), st.sampled_from(["node", "waypoint"]))
_policy_dir: Path | None = None


def check_policy(value: tuple[str, str]) -> None:
    global _policy_dir
    text, role = value
    if _policy_dir is None:
        _policy_dir = Path(tempfile.mkdtemp(prefix="meshd-fuzz-policy-"))
    (_policy_dir / "fuzz.toml").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_policy_dir(_policy_dir, role=role)  # type: ignore[arg-type]
    except ConfigError as exc:
        assert exc.problems
        str(exc)
    except UnicodeEncodeError:
        pass  # a lone surrogate cannot even be written as a file; nothing to test


POLICY = Target(
    "policy", "policy TOML (authorization, peer authentication, routes)", POLICY_INPUT, check_policy
)


# ---- catalog JSON -------------------------------------------------------------------------------

_GOOD_CATALOG: dict[str, Any] = {
    "version": 1,
    "node": "beta",
    "trust_domain": "home.arpa",
    "role": "node",
    "hbone": "10.0.0.2:15008",
    "workloads": [
        {
            "name": "echo",
            "namespace": "default",
            "service_account": "echo",
            "address": "10.0.0.2",
            "ports": [7000],
            "services": ["echo"],
            "labels": {"app": "echo"},
        }
    ],
    "services": [
        {
            "name": "echo",
            "namespace": "default",
            "ports": [{"port": 7000, "target_port": 7000, "protocol": "tcp"}],
            "waypoint": None,
        }
    ],
}
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutated(draw: st.DrawFn, good: Any) -> Any:
    """A copy of a valid document with up to three values replaced by arbitrary JSON or removed."""
    doc = json.loads(json.dumps(good))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if draw(st.booleans()):
            parent[path[-1]] = draw(_JSON)
        elif isinstance(parent, dict):
            del parent[path[-1]]
    return doc


@st.composite
def _catalog_bytes(draw: st.DrawFn) -> bytes:
    doc = _mutated(draw, _GOOD_CATALOG)
    return json.dumps(doc).encode()


CATALOG_INPUT = st.one_of(
    _catalog_bytes(), st.binary(max_size=200), _JSON.map(lambda j: json.dumps(j).encode())
)
_LOCAL = NodeCatalog.decode(
    json.dumps({**_GOOD_CATALOG, "node": "alpha", "hbone": "10.0.0.1:15008", "workloads": []}).encode(),
    trust_domain="home.arpa",
)


def check_catalog(data: bytes) -> None:
    try:
        cat = NodeCatalog.decode(data, trust_domain="home.arpa")
    except CatalogError as exc:
        assert str(exc)
        return
    assert NodeCatalog.decode(cat.encode(), trust_domain="home.arpa") == cat
    merged = merge(_LOCAL, [PeerRecord(cat, "10.0.0.9")])
    for key, svc in merged.services.items():
        for port in svc.ports:
            merged.endpoints(key, port.port)
    merged.to_json()


CATALOG = Target("catalog", "catalog JSON from peers (decode + merge)", CATALOG_INPUT, check_catalog)


# ---- network catalog JSON (from gateways) and the gateway's admission ---------------------------

_GOOD_NETWORK: dict[str, Any] = {
    "version": 1,
    "network": "site-b",
    "catalogs": [
        {**_GOOD_CATALOG, "network": "site-b"},
        {
            **_GOOD_CATALOG,
            "node": "gwb",
            "role": "gateway",
            "hbone": "0.0.0.0:15008",
            "workloads": [],
            "services": [],
            "network": "site-b",
            "gateway": {"public": "198.51.100.2:15008", "networks": ["site-b"]},
        },
        {**_GOOD_CATALOG, "node": "a1", "hbone": "10.0.1.1:15008", "workloads": [], "network": "site-a"},
    ],
}


@st.composite
def _network_input(draw: st.DrawFn) -> tuple[bytes, str]:
    doc = _mutated(draw, _GOOD_NETWORK)
    body = draw(st.one_of(st.just(json.dumps(doc).encode()), st.binary(max_size=100)))
    authority = draw(
        st.one_of(
            st.sampled_from(["10.0.0.2:7000", "10.0.0.2:15008", "10.0.0.2:1", "[::1]:7000"]),
            st.text(max_size=24),
        )
    )
    return body, authority


def check_network_catalog(value: tuple[bytes, str]) -> None:
    body, authority = value
    try:
        cats = decode_network_catalog(body, trust_domain="home.arpa", own_network="site-b")
    except CatalogError as exc:
        assert str(exc)
        return
    assert all(c.network != "site-b" for c in cats)
    # What gwb would hold: its own network's node (as fetched first-hand) and what came from site A.
    local = NodeCatalog.decode(json.dumps(_GOOD_NETWORK["catalogs"][1]).encode(), trust_domain="home.arpa")
    beta = NodeCatalog.decode(json.dumps(_GOOD_NETWORK["catalogs"][0]).encode(), trust_domain="home.arpa")
    merged = merge(local, [PeerRecord(beta, "10.0.0.2"), *(PeerRecord(c, "") for c in cats)])
    for peer in [SpiffeId.node("home.arpa", c.node) for c in cats] + [SpiffeId("home.arpa", "default", "x")]:
        try:
            forward = admit(merged, GatewayConfig(), ("site-b",), peer, authority)
        except Refused as refused:
            assert refused.status in (400, 401, 503) and refused.reason
            continue
        assert forward.target_node == "beta" and forward.source_network != "site-b"


NETWORK_CATALOG = Target(
    "network-catalog",
    "network catalog JSON from gateways (decode + merge) and outer CONNECT admission",
    _network_input(),
    check_network_catalog,
)


# ---- mDNS TXT -----------------------------------------------------------------------------------

_GOOD_TXT: dict[Any, Any] = {
    b"v": b"1",
    b"td": b"home.arpa",
    b"role": b"node",
    b"node": b"beta",
    b"port": b"15008",
    b"rev": b"0123abcd",
}
_TXT_KEYS = st.one_of(
    st.sampled_from([b"v", b"td", b"role", b"node", b"port", b"rev", b"V", b"Port"]),
    st.binary(max_size=6),
    st.text(max_size=4),
)
_TXT_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=20),
    st.text(max_size=10),
    st.sampled_from([b"1", b"01", b"65536", b"0", b"\xff", b"waypoint", b"x" * 300]),
)
TXT_INPUT = st.one_of(
    st.dictionaries(_TXT_KEYS, _TXT_VALUES, max_size=4).map(lambda change: {**_GOOD_TXT, **change}),
    st.dictionaries(_TXT_KEYS, _TXT_VALUES, max_size=8),
)


def check_txt(props: dict[Any, Any]) -> None:
    try:
        ann = parse_txt(props)
    except TxtError as exc:
        assert str(exc)
        return
    assert parse_txt({k.encode(): v.encode() for k, v in ann.to_txt().items()}) == ann


MDNS = Target("mdns_txt", "mDNS TXT records", TXT_INPUT, check_txt)


# ---- etcd watch streams and entries -------------------------------------------------------------

_ETCD_PREFIX = "/meshd/home.arpa/"


def _etcd_value(draw: st.DrawFn) -> bytes:
    good = {"v": 1, "td": "home.arpa", "node": "beta", "role": "node", "hbone": "10.0.0.2:15008", "rev": "ab"}
    change = draw(
        st.dictionaries(
            st.sampled_from(["v", "td", "node", "role", "hbone", "rev", "x"]),
            st.one_of(st.none(), st.integers(), st.text(max_size=12), st.booleans()),
            max_size=3,
        )
    )
    return draw(st.one_of(st.just(json.dumps({**good, **change}).encode()), st.binary(max_size=40)))


@st.composite
def _etcd_stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A watch stream: well-formed messages (puts, deletes, created, compacted, errors) mixed with junk."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        node = draw(st.sampled_from(["beta", "gamma", "alpha", "x" * 70, "Bad"]))
        key = draw(st.sampled_from([f"{_ETCD_PREFIX}nodes/{node}", f"{_ETCD_PREFIX}other", "/elsewhere"]))
        kv = {
            "key": etcd_wire.b64(key.encode()),
            "value": etcd_wire.b64(_etcd_value(draw)),
            "mod_revision": str(draw(st.integers(-1, 50))),
        }
        event: dict[str, Any] = {"kv": kv, **draw(st.sampled_from([{}, {"type": "DELETE"}, {"type": "X"}]))}
        header = {"revision": draw(st.sampled_from(["7", 7, "x", None]))}
        result = draw(
            st.sampled_from(
                [
                    {"header": header, "events": [event]},
                    {"header": header, "created": True},
                    {"header": header, "canceled": True, "compact_revision": "3"},
                    {"header": header, "canceled": True},
                    {"header": header, "events": "x"},
                ]
            )
        )
        message = draw(
            st.sampled_from(
                [{"result": result}, {"error": {"grpc_code": 14, "message": "x"}}, [], {"result": 1}]
            )
        )
        lines.append(json.dumps(message).encode())
    junk = draw(st.binary(max_size=30))
    data = b"\n".join([*lines, junk] if draw(st.booleans()) else lines)
    return data, draw(st.lists(st.integers(0, 4096), max_size=6))


def check_etcd(value: tuple[bytes, list[int]]) -> None:
    data, cuts = value
    decoder = etcd_wire.WatchDecoder()
    view = etcd_wire.EtcdView(_ETCD_PREFIX, "home.arpa", "alpha")
    try:
        events = [e for chunk in _cuts(data, cuts) for e in decoder.feed(chunk)] + decoder.close()
    except (etcd_wire.EtcdProtocolError, etcd_wire.EtcdServerError) as exc:
        assert str(exc)
        return
    live: set[str] = set()
    for event in events:
        if isinstance(event, etcd_wire.WatchChanges):
            for hint in view.apply(event):
                if isinstance(hint, etcd_wire.Seen):
                    live.add(hint.node)
                elif isinstance(hint, etcd_wire.Gone):
                    live.discard(hint.node)
    # The hints replay to exactly the view's entries; every entry is a valid one, and never our own.
    assert live == set(view.entries) and "alpha" not in live
    for node, entry in view.entries.items():
        key = etcd_wire.node_key(_ETCD_PREFIX, node)
        assert (
            etcd_wire.decode_entry(key, entry.encode(), prefix=_ETCD_PREFIX, trust_domain="home.arpa")
            == entry
        )


ETCD = Target("etcd_watch", "etcd watch streams and entries (discovery.etcd)", _etcd_stream(), check_etcd)


# ---- DNS proxy packets --------------------------------------------------------------------------

_SERVICES = {
    "echo.default": ServiceEntry(
        "echo", "default", (ServicePortEntry(7000, 7000, "tcp"), ServicePortEntry(80, 8080, "http"))
    ),
    "db.prod": ServiceEntry("db", "prod", (ServicePortEntry(5432, 5432, "tcp"),)),
}
_VIPS = allocate(_SERVICES)
_NAMES = st.sampled_from(
    [
        "echo.default.mesh.",
        "ECHO.default.",
        "_7000._tcp.echo.default.mesh.",
        "x.mesh.",
        "_99._tcp.db.prod.mesh.",
        "mesh.",
        ".",
        "example.com.",
        "a.b.c.d.e.mesh.",
        "_x._tcp.echo.default.mesh.",
        "\\000.mesh.",
        "db.prod",
    ]
)
_RDTYPES = st.sampled_from(["A", "AAAA", "SRV", "ANY", "TXT", "PTR", "AXFR", "OPT", "TYPE65000"])


@st.composite
def _dns_wire(draw: st.DrawFn) -> bytes:
    q = dns.message.make_query(
        draw(_NAMES),
        dns.rdatatype.from_text(draw(_RDTYPES)),
        use_edns=draw(st.sampled_from([False, 0])),
        payload=draw(st.sampled_from([0, 100, 512, 4096, 65535])),
    )
    wire = bytearray(q.to_wire())
    for pos, byte in draw(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3)):
        if wire:
            wire[pos % len(wire)] = byte
    return bytes(wire[: draw(st.integers(0, len(wire)))] if draw(st.booleans()) else wire)


DNS_INPUT = st.tuples(
    st.one_of(_dns_wire(), st.binary(max_size=100)),
    st.booleans(),
    st.sampled_from(["mesh", "Mesh.", "", "a.b"]),
)


def check_dns(value: tuple[bytes, bool, str]) -> None:
    wire, udp, domain = value
    query = parse(wire)
    if query is None:
        answer = formerr(wire)
        if answer is not None:
            assert len(answer) == 12 and answer[:2] == wire[:2]
        return
    decision = decide(query, domain, _SERVICES, _VIPS)
    if decision.response is not None:
        out = to_wire(decision.response, query, udp=udp)
        limit = 65535 if not udp else max(query.payload, 512) if query.edns >= 0 else 512
        assert len(out) <= limit
        assert dns.message.from_wire(out).id == query.id


DNS = Target("dns", "DNS proxy queries (pure answer function)", DNS_INPUT, check_dns)


# ---- capsules on a connect-udp stream -----------------------------------------------------------

_CAPSULE_PIECES = st.one_of(
    st.binary(max_size=1500).map(encode_datagram),
    st.tuples(st.integers(0, 2**62 - 1), st.binary(max_size=200)).map(lambda t: encode_capsule(*t)),
    st.tuples(st.integers(1, 2**62 - 1), st.binary(max_size=50)).map(
        lambda t: encode_capsule(0, encode_varint(t[0]) + t[1])  # a context id no extension negotiated
    ),
    st.binary(max_size=20),  # garbage, truncated headers, huge announced lengths
)
CAPSULE_INPUT = st.tuples(
    st.lists(_CAPSULE_PIECES, max_size=20),
    st.lists(st.integers(0, 40_000), max_size=8),
    st.integers(0, MAX_UDP_PAYLOAD),
)


def check_capsules(value: tuple[list[bytes], list[int], int]) -> None:
    pieces, cuts, max_datagram = value
    decoder = CapsuleDecoder(max_datagram)
    wire = b"".join(pieces)
    try:
        for chunk in _cuts(wire, cuts):
            for payload in decoder.feed(chunk):
                assert len(payload) <= max_datagram
            # Held: one capsule header and one datagram's value at most (unknown capsules are skipped).
            assert decoder.buffered <= max_datagram + 8 + 16
        decoder.finish()
    except CapsuleError:
        return


CAPSULES = Target("capsules", "connect-udp capsules (RFC 9297 decoder)", CAPSULE_INPUT, check_capsules)


_WASM_PATHS = st.sampled_from(
    [b"plugin_root_id", b"source.principal", b"request\0headers\0x-a", b"request.headers.x-a"]
)
WASM_ABI_INPUT = st.tuples(
    st.one_of(
        st.binary(max_size=120),
        st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), max_size=5).map(
            lambda pairs: wasm_abi.serialize_map(pairs)
        ),
    ),
    st.one_of(_WASM_PATHS, st.binary(max_size=30)),
    st.tuples(st.binary(max_size=20), st.integers(-2, 40), st.integers(-2, 40), st.binary(max_size=8)),
)


def check_wasm_abi(value: tuple[bytes, bytes, tuple[bytes, int, int, bytes]]) -> None:
    """What a plugin's memory hands the host: a map, a property path, a buffer edit. Only AbiError
    escapes, and a map that parses serializes back to the same bytes."""
    data, path, (buf, start, size, new) = value
    try:
        pairs = wasm_abi.deserialize_map(data)
        assert wasm_abi.serialize_map(pairs) == data or data == b"\0"
    except wasm_abi.AbiError:
        pass
    props: dict[tuple[str, ...], wasm_abi.PropertyValue] = {
        ("plugin_root_id",): "x",
        ("request", "headers"): [("x-a", "1")],
    }
    with contextlib.suppress(wasm_abi.AbiError):
        wasm_abi.lookup_property(props, wasm_abi.property_path(path))
    try:
        out = wasm_abi.buffer_edit(buf, start, size, new)
        assert new in out
        wasm_abi.buffer_slice(out, start, size)
    except wasm_abi.AbiError:
        pass


WASM_ABI = Target(
    "wasm_abi", "proxy-wasm ABI (maps, property paths, buffer edits)", WASM_ABI_INPUT, check_wasm_abi
)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (HBONE, HTTP1, CONFIG, POLICY, CATALOG, MDNS, DNS, ETCD, CAPSULES, WASM_ABI, NETWORK_CATALOG)
}
