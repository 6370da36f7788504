"""Two sites behind NAT and a public link between their gateways, as network namespaces.

    site A (10.236.1.0/24, bridge in mgwy<id>-a)      site B (10.236.2.0/24, bridge in mgwy<id>-b)
      a1 10.236.1.11                                     b1 10.236.2.11, wb 10.236.2.12
      gwa eth0 10.236.1.1 ---+                     +--- gwb eth0 10.236.2.1
                             |  public 10.236.0.0/24 (bridge in mgwy<id>-p)
                  gwa eth1 10.236.0.1 ------------- gwb eth1 10.236.0.2

Each gateway namespace is its site's router: site hosts route everything via it, and it masquerades
what leaves on its public side (a home router's NAT). So a site's hosts can dial the other site's
gateway (through their own NAT) and nothing else of the other site: the gateways have no route into
the other site, and each gateway drops forwarding from its public side into its site. Every name
starts with `mgwy`, every address is in 10.236.0.0/16, and everything is deleted at the end.
"""

from __future__ import annotations

import secrets
import subprocess

from tests.netns.lab import Host, Namespaces, ip

PUBLIC = "10.236.0"
SITE_SUBNETS = {"a": "10.236.1", "b": "10.236.2"}


def nft(ns: str, script: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=10,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {proc.stderr.strip()}")


class Sites(Namespaces):
    def __init__(self) -> None:
        super().__init__("mgwy" + secrets.token_hex(3))
        self.hosts: dict[str, Host] = {}  # type: ignore[assignment]  # by label: the tests name them
        self._veths = 0

    def started_on(self) -> list[Host]:
        return list(self.hosts.values())

    @classmethod
    def create(cls) -> Sites:
        return cls().built()

    def _build(self) -> None:
        for bridge in ("a", "b", "p"):
            ns = f"{self.id}-{bridge}"
            self._add_ns(ns)
            ip("-n", ns, "link", "add", "br0", "type", "bridge")
            ip("-n", ns, "link", "set", "br0", "up")
        for site in ("a", "b"):
            self._gateway(site)

    def _plug(self, host_ns: str, bridge: str, ifname: str, address: str) -> None:
        self._veths += 1
        port = f"v{self._veths}"
        bridge_ns = f"{self.id}-{bridge}"
        ip("-n", bridge_ns, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", host_ns)
        ip("-n", bridge_ns, "link", "set", port, "master", "br0", "up")
        ip("-n", host_ns, "addr", "add", f"{address}/24", "dev", ifname)
        ip("-n", host_ns, "link", "set", ifname, "up")

    def _gateway(self, site: str) -> None:
        label = f"gw{site}"
        ns = f"{self.id}-{label}"
        self._add_ns(ns)
        inside, public = f"{SITE_SUBNETS[site]}.1", f"{PUBLIC}.{1 if site == 'a' else 2}"
        self._plug(ns, site, "eth0", inside)
        self._plug(ns, "p", "eth1", public)
        subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True, timeout=10
        )
        nft(
            ns,
            "table ip mgwy_nat {\n"
            "  chain gw_nat {\n    type nat hook postrouting priority 100;\n"
            '    oifname "eth1" masquerade\n  }\n'
            "  chain gw_guard {\n    type filter hook forward priority 0;\n"
            '    iifname "eth1" oifname "eth0" ct state new drop\n  }\n'
            "}\n",
        )
        self.hosts[label] = Host(label, ns, public)

    def add_host(self, site: str, label: str, last_octet: int) -> Host:
        ns = f"{self.id}-{label}"
        self._add_ns(ns)
        address = f"{SITE_SUBNETS[site]}.{last_octet}"
        self._plug(ns, site, "eth0", address)
        ip("-n", ns, "route", "add", "default", "via", f"{SITE_SUBNETS[site]}.1")
        host = Host(label, ns, address)
        self.hosts[label] = host
        return host

    def block_inbound_hbone(self, gateway: str, port: int = 15008) -> None:
        """The gateway's public side accepts no connection to `port` (a site where no port can be
        opened): new TCP connections to it arriving on eth1 are dropped."""
        nft(
            f"{self.id}-{gateway}",
            "table ip mgwy_block {\n"
            "  chain gw_block {\n    type filter hook input priority 0;\n"
            f'    iifname "eth1" tcp dport {port} ct state new drop\n  }}\n'
            "}\n",
        )
