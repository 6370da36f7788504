"""HBONE: TCP tunnelled as HTTP/2 CONNECT streams inside mutual TLS 1.3, byte-compatible with ztunnel.

Layout: `events`, `connection` (sans-I/O core, no trio); `tls` (contexts, identities); `stream`,
`server`, `pool` (thin trio adapters). See docs/hbone.md. This package file imports nothing, so the
sans-I/O core can be used without pulling in trio.
"""
