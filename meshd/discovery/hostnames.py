"""Service hostnames on the wire: how a meshd service is named in a CONNECT `:authority` (double HBONE).

ztunnel names the destination of double HBONE by the service's hostname (`HboneAddress::SvcHostname
(service.hostname, port)`, istio/ztunnel `src/proxy/outbound.rs`, `build_request_through_gateway`), and
Istio's hostname for a Kubernetes Service is its cluster FQDN, `<name>.<namespace>.svc.cluster.local`.
meshd's catalog keys a service `<name>.<namespace>`, so the mapping is one suffix: meshd sends that FQDN
and takes only that form back (not the short `<name>.<namespace>`, nor the DNS proxy's `dns.domain`
names, which are local choices of each host). A ztunnel client that knows the service under the same
name and namespace names it identically.
"""

from __future__ import annotations

SERVICE_DOMAIN = "svc.cluster.local"
_SUFFIX = "." + SERVICE_DOMAIN


def service_hostname(service_key: str) -> str:
    """`echo.default` -> `echo.default.svc.cluster.local`."""
    return service_key + _SUFFIX


def service_key_of(hostname: str) -> str | None:
    """`echo.default.svc.cluster.local` (any case) -> `echo.default`; None for any other name."""
    name = hostname.lower()
    if not name.endswith(_SUFFIX):
        return None
    key = name[: -len(_SUFFIX)]
    parts = key.split(".")
    return key if len(parts) == 2 and all(parts) else None


def hostname_hint() -> str:
    """What to write instead, for refusal reasons."""
    return f"<name>.<namespace>.{SERVICE_DOMAIN}:<port>"
