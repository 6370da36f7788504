"""Inputs the fuzzers found that once broke meshd: each stays here as an explicit test."""

from __future__ import annotations

from pathlib import Path

import pytest
from hpack import Encoder
from hyperframe.frame import HeadersFrame, RstStreamFrame, SettingsFrame

from fuzz.targets import _GOOD_TXT as GOOD_TXT
from fuzz.targets import CONFIG, DNS, HBONE, MDNS, PREFACE
from meshd.config.load import parse_overrides
from meshd.config.model import Config
from meshd.config.schema import load_document
from meshd.discovery.mdns import TxtError, parse_txt
from meshd.errors import ConfigError
from meshd.hbone import events as ev
from meshd.hbone.connection import REFUSED_STREAM, HboneConnection, Role
from tests.support.frames import frames_in

# A DNS *response* (QR set) for a mesh name sent to the proxy: `decide` built a response to a response
# and dns.message.make_response raised FormError, which escaped the UDP handler and took the DNS proxy
# down. Now `parse` treats a response as not-a-query: no answer, nothing forwarded.
DNS_RESPONSE_FOR_A_MESH_NAME = b"\x9f\x91\x80\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04mesh\x00\x00\x01\x00\x01"


def test_dns_response_sent_to_the_proxy_is_ignored() -> None:
    from meshd.capture.dns import formerr, parse

    assert parse(DNS_RESPONSE_FOR_A_MESH_NAME) is None
    assert formerr(DNS_RESPONSE_FOR_A_MESH_NAME) is None  # and no FORMERR to a response either
    DNS.run((DNS_RESPONSE_FOR_A_MESH_NAME, True, "mesh"))


def test_infinite_or_huge_durations_are_config_errors() -> None:
    # `ca.cert_ttl = inf` (and 1e20, nan, "99999999999d") raised OverflowError out of the config loader.
    for text in (
        "ca.cert_ttl = inf",
        "ca.cert_ttl = nan",
        "ca.cert_ttl = 1e20",
        'ca.cert_ttl = "99999999999d"',
    ):
        CONFIG.run((text, []))
    with pytest.raises(ConfigError, match="not a usable duration"):
        load_document(Config, "ca.cert_ttl = inf\n", "x.toml", Path("/tmp"))
    with pytest.raises(ConfigError, match="not a usable duration"):
        parse_overrides(["ca.cert_ttl=99999999999d"])


def _connect_flood(count: int) -> bytes:
    enc = Encoder()
    wire = PREFACE + SettingsFrame(0).serialize()
    for i in range(count):
        f = HeadersFrame(1 + 2 * i, data=enc.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")]))
        f.flags.add("END_HEADERS")
        wire += f.serialize()
    return wire


def test_connect_beyond_the_stream_limit_refuses_only_the_extra_streams() -> None:
    # The 101st concurrent CONNECT made h2 raise TooManyStreamsError: a connection error that killed the
    # 100 tunnels already open. Now the extra streams get RST_STREAM(REFUSED_STREAM), the rest carry on.
    server = HboneConnection(Role.SERVER)
    events = server.receive_data(_connect_flood(130))
    assert not server.closed
    opened = [e.stream_id for e in events if isinstance(e, ev.TunnelRequested)]
    assert opened == [1 + 2 * i for i in range(100)]
    refused = [
        f.stream_id
        for f in frames_in(server.data_to_send())
        if isinstance(f, RstStreamFrame) and f.error_code == REFUSED_STREAM
    ]
    assert refused == [1 + 2 * i for i in range(100, 130)]
    # The HPACK context stays in sync: once a slot frees up, the next CONNECT decodes and opens.
    flood = _connect_flood(102)
    cut = len(_connect_flood(101))
    more = HboneConnection(Role.SERVER)
    more.receive_data(flood[:cut])  # 100 open, the 101st (stream 201) refused
    more.release_stream(1)
    late = more.receive_data(flood[cut:])
    assert [e.stream_id for e in late if isinstance(e, ev.TunnelRequested)] == [203]
    assert not more.closed


def test_path_with_unknown_user_home_is_a_config_error() -> None:
    # `~0` made Path.expanduser raise RuntimeError out of the loader.
    CONFIG.run(("", ["ca.dir=~0"]))
    with pytest.raises(ConfigError, match="cannot expand"):
        load_document(Config, 'identity.ca_dir = "~no-such-user-xyz/ca"\n', "x.toml", Path("/tmp"))


def test_response_with_a_non_numeric_status_resets_that_stream() -> None:
    # A peer answering `:status: abc` made the client core raise ValueError out of receive_data.
    HBONE.run((Role.CLIENT, [("headers", 1, [(":status", "abc")], {"END_HEADERS", "END_STREAM"})], b"", []))
    client = HboneConnection(Role.CLIENT)
    sid = client.open_tunnel("10.0.0.1:80")
    client.data_to_send()
    bad = HeadersFrame(sid, data=Encoder().encode([(":status", "abc")]))
    bad.flags.add("END_HEADERS")
    events = client.receive_data(SettingsFrame(0).serialize() + bad.serialize())
    assert ev.StreamReset(sid, 1, remote=False) in events and not client.closed


def test_txt_with_non_ascii_digits_is_a_txt_error() -> None:
    # "¹".isdigit() is True but int("¹") raises ValueError: one multicast packet broke parse_txt.
    for key in (b"v", b"port"):
        MDNS.run({**GOOD_TXT, key: "¹".encode()})
        with pytest.raises(TxtError):
            parse_txt({**GOOD_TXT, key: "\u0661".encode()})
