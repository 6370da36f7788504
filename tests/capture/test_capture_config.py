"""The [capture] and [dns] keys: defaults, parsing, and FILE:LINE errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.errors import ConfigError
from meshd.units import Address
from tests.support.configs import load_text

BASE = '[identity]\nca_dir = "./ca"\n'


def test_defaults_off(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE)
    assert cfg.capture.mode == "off" and cfg.capture.listen == Address("127.0.0.1", 15001)
    assert cfg.capture.vip_range == "240.240.0.0/16" and not cfg.capture.inbound
    assert not cfg.dns.enabled and cfg.dns.listen == Address("127.0.0.1", 15053) and cfg.dns.domain == "mesh"


def test_set(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        BASE
        + '[capture]\nmode = "nftables"\ninbound = true\n[dns]\nenabled = true\nupstreams = ["127.0.0.1:5300"]\n',
    )
    assert cfg.capture.mode == "nftables" and cfg.capture.inbound
    assert cfg.dns.upstreams == (Address("127.0.0.1", 5300),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[capture]\nvip_range = "240.240.0.0/33"\n', ":4: capture.vip_range"),
        ('[capture]\nvip_range = "10.0.0.0/31"\n', ":4: capture.vip_range 10.0.0.0/31 is too small"),
        ('[capture]\nmode = "iptables"\n', ":4: capture.mode = 'iptables' is not one of"),
        ('[dns]\ndomain = "Bad Domain"\n', ":4: domain 'Bad Domain' must be lowercase"),
        ("[dns]\nenabled = true\ncapture = true\n", ":5: dns.capture needs transparent capture"),
        ('[capture]\nmode = "nftables"\n[dns]\ncapture = true\n', ":6: dns.capture needs the DNS proxy"),
        (
            '[capture]\nmode = "nftables"\n[dns]\nenabled = true\ncapture = true\nlisten = "127.0.0.2:53"\n',
            ":8: dns.capture redirects to 127.0.0.1, but dns.listen is 127.0.0.2:53",
        ),
    ],
)
def test_errors_name_the_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, BASE + text)
    assert expected in str(info.value), str(info.value)
