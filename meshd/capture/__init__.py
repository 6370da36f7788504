"""Transparent mode: service VIPs, the DNS proxy for mesh names, and nftables capture.

- `vip` (pure): a stable virtual IP per service, the same on every node.
- `dns` (pure): answers for mesh names; `dns_server`: the trio UDP/TCP proxy that forwards the rest.
- `nft` (pure ruleset text, plus applying it with `nft -f`); `transparent`: the 15001 listener and
  the component the node starts.
"""
