"""meshd: an ambient service mesh (ztunnel + waypoint semantics) for Linux hosts without Kubernetes."""

__version__ = "0.1.0"
