"""The nftables ruleset meshd installs (pure text) and the CAP_NET_ADMIN check."""

from __future__ import annotations

from meshd.capture.nft import DNS_MARK, InboundRule, delete_command, has_net_admin, ruleset, udp_map_script


def test_outbound_only() -> None:
    assert ruleset("240.240.0.0/16", 15001, 15006, []) == (
        "table ip meshd\n"
        "delete table ip meshd\n"
        "table ip meshd {\n"
        "\tmap udp_vips {\n"
        "\t\ttypeof ip daddr . udp dport : udp dport\n"
        "\t}\n"
        "\tchain output {\n"
        "\t\ttype nat hook output priority -100; policy accept;\n"
        "\t\tip daddr 240.240.0.0/16 ip protocol tcp redirect to :15001\n"
        "\t\tip daddr 240.240.0.0/16 ip protocol udp redirect to :ip daddr . udp dport map @udp_vips\n"
        "\t}\n"
        "}\n"
    )


def test_udp_map_replaces_its_elements_in_one_transaction() -> None:
    assert udp_map_script({("240.240.0.9", 53): 40001, ("240.240.0.5", 514): 40002}) == (
        "flush map ip meshd udp_vips\n"
        "add element ip meshd udp_vips { 240.240.0.5 . 514 : 40002, 240.240.0.9 . 53 : 40001 }\n"
    )
    assert udp_map_script({}) == "flush map ip meshd udp_vips\n"


def test_dns_capture_redirects_port_53_except_the_proxys_own_queries() -> None:
    text = ruleset("240.240.0.0/16", 15001, 15006, [], dns_port=15053)
    assert (
        "\t\tip daddr 240.240.0.0/16 ip protocol udp redirect to :ip daddr . udp dport map @udp_vips\n"
        f"\t\tmeta mark {DNS_MARK:#x} return\n"
        "\t\tudp dport 53 redirect to :15053\n"
        "\t\ttcp dport 53 redirect to :15053\n\t}\n"
    ) in text


def test_inbound_protection_redirects_permissive_and_drops_strict_off_loopback() -> None:
    text = ruleset(
        "240.240.0.0/16",
        15001,
        15006,
        [
            InboundRule("10.0.0.1", 8000, "redirect"),
            InboundRule("10.0.0.1", 7100, "drop"),
            InboundRule("0.0.0.0", 9000, "drop"),
        ],
    )
    assert (
        "\tchain prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n"
        '\t\tiifname != "lo" ip daddr 10.0.0.1 tcp dport 8000 redirect to :15006\n\t}\n'
    ) in text
    assert (
        "\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n"
        '\t\tiifname != "lo" ip daddr 10.0.0.1 tcp dport 7100 drop\n'
        '\t\tiifname != "lo" tcp dport 9000 drop\n\t}\n'
    ) in text


def test_only_ever_its_own_table() -> None:
    text = ruleset("10.99.0.0/24", 25001, 25006, [InboundRule("10.0.0.1", 1, "drop")])
    assert "flush ruleset" not in text
    tables = [line for line in text.splitlines() if "table" in line]
    assert tables == ["table ip meshd", "delete table ip meshd", "table ip meshd {"]
    assert delete_command() == "delete table ip meshd\n"


def test_cap_net_admin_from_proc_status() -> None:
    assert has_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert has_net_admin("CapEff:\t0000000000001000\n")
    assert not has_net_admin("CapEff:\t0000000000000000\n")
    assert not has_net_admin("Name:\tx\n")
