"""Two subnets joined by a router, as network namespaces: multicast (mDNS) does not cross it.

Layout: a namespace `<id>-r` is the router; it holds one bridge per subnet (`metc-brA`, `metc-brB`,
addresses 10.234.1.1/24 and 10.234.2.1/24) and forwards between them. Each host is a namespace
`<id>-<label>` whose `eth0` is a veth into its subnet's bridge, with a default route via the router.
Every name starts with `metc` and every address is in 10.234.0.0/16; nothing touches the host's own
network namespace, and `close()` deletes every namespace (and with them the veths and bridges).
The `Host` objects are tests/netns/lab.py's, so `NsMeshd`, `tagged_echo` and `exchange` work on them.
"""

from __future__ import annotations

import secrets
import subprocess

from tests.netns.lab import Host, Namespaces, ip

SUBNETS = {"A": "10.234.1", "B": "10.234.2"}


class RoutedLab(Namespaces):
    def __init__(self) -> None:
        super().__init__("metc" + secrets.token_hex(3))
        self.router = f"{self.id}-r"

    @classmethod
    def create(cls) -> RoutedLab:
        return cls().built()

    def _build(self) -> None:
        self._add_ns(self.router)
        for name, net in SUBNETS.items():
            ip("-n", self.router, "link", "add", f"metc-br{name}", "type", "bridge", "mcast_snooping", "0")
            ip("-n", self.router, "addr", "add", f"{net}.1/24", "dev", f"metc-br{name}")
            ip("-n", self.router, "link", "set", f"metc-br{name}", "up")
        self.exec_in(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def exec_in(self, ns: str, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True, timeout=10)

    def add_host(self, subnet: str) -> Host:
        n = len(self.hosts) + 1
        label = f"h{n}"
        host = Host(label, f"{self.id}-{label}", f"{SUBNETS[subnet]}.{10 + n}")
        self._add_ns(host.ns)
        veth = f"metc-v{n}"
        ip("-n", self.router, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        ip("-n", self.router, "link", "set", veth, "master", f"metc-br{subnet}", "up")
        ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        ip("-n", host.ns, "link", "set", "eth0", "multicast", "on", "up")
        ip("-n", host.ns, "route", "add", "default", "via", f"{SUBNETS[subnet]}.1")
        self.hosts.append(host)
        return host
