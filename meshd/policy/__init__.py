"""Policy: authorization (ALLOW / DENY / AUDIT) and peer authentication (mTLS mode), as in Istio.

`model` is the file schema, `load` reads a folder of TOML files into a `PolicySet`, and `evaluate`
decides, purely, whether a connection (node) or request (waypoint) is allowed.
"""

from meshd.policy.evaluate import (
    ConnectionAttrs,
    Decision,
    PolicySet,
    RequestAttrs,
    authorize_connection,
    authorize_request,
    mtls_mode,
)
from meshd.policy.load import load_policy_dir
from meshd.policy.model import AuthorizationPolicy, PeerAuthentication, PolicyFile

__all__ = [
    "AuthorizationPolicy",
    "ConnectionAttrs",
    "Decision",
    "PeerAuthentication",
    "PolicyFile",
    "PolicySet",
    "RequestAttrs",
    "authorize_connection",
    "authorize_request",
    "load_policy_dir",
    "mtls_mode",
]
