"""Node inbound for UDP: a connect-udp stream (RFC 9298) on 15008 -> L4 authorization -> a UDP socket of
its own to the local workload -> datagrams both ways until the client ends the stream or the flow idles.

Must never know: TCP, the outbound side's flow table.

The peer is authenticated already (HboneServer). The target (`:path`) must be a local workload's
ip:port (else 503), and L4 authorization must allow the flow with the same attributes a TCP
connection has: principal, namespace, source IP, destination port (else 401). A workload bound to a
waypoint is still authorized here, at L4: waypoints carry HTTP, not datagrams (docs/hbone.md).
"""

from __future__ import annotations

import logging

import trio

from meshd.config.model import UdpConfig
from meshd.dataplane.state import NodeState
from meshd.discovery.catalog import WorkloadEntry
from meshd.hbone.capsule import CapsuleError
from meshd.hbone.server import InboundRequest, ServerReply
from meshd.hbone.stream import TunnelStream
from meshd.node.udp import DatagramSocket, encode_batch, expire_when_idle, tunnel_to_socket
from meshd.observe.accesslog import (
    FLAG_NO_ROUTE,
    FLAG_UNAUTHORIZED,
    FLAG_UPSTREAM_CONNECT,
    ConnectionRecord,
    WorkloadLabels,
    source_of,
)
from meshd.observe.udp import FlowCounters, FlowMeter, UdpTelemetry
from meshd.policy.evaluate import ConnectionAttrs, authorize_connection
from meshd.units import Address

log = logging.getLogger("meshd.inbound.udp")

REPORTER = "destination"
CAPSULE_PROTOCOL = ("capsule-protocol", "?1")


class UdpInbound:
    def __init__(self, state: NodeState, telemetry: UdpTelemetry) -> None:
        self.state = state
        self.telemetry = telemetry
        self.active = 0

    @property
    def limits(self) -> UdpConfig:
        """The `[udp]` settings in force (a reload applies them to the flows opened after it)."""
        return self.state.config.udp

    def _local_workload(self, ip: str, port: int) -> WorkloadEntry | None:
        for w in self.state.catalog.local.workloads:
            if w.address == ip and port in w.ports:
                return w
        return None

    async def handle(self, req: InboundRequest, reply: ServerReply) -> None:
        dest = req.destination
        if dest is None:
            await reply.refuse(400, f"connect-udp target {req.path!r} is not an IP and port")
            return
        ip, port = dest
        rec = ConnectionRecord(
            reporter=REPORTER,
            src=req.client_address,
            dst=str(Address(ip, port)),
            source_identity=req.peer_identity,
            source=source_of(self.state.catalog, req.peer_identity, req.client_address),
            peer=str(Address(*req.peer_address)),
            protocol="udp",
        )
        workload = self._local_workload(ip, port)
        if workload is None:
            await self._refuse(
                reply, rec, FLAG_NO_ROUTE, 503, f"no workload on this node listens on {ip}:{port}"
            )
            return
        rec.destination_identity = workload.identity(self.state.config.trust_domain)
        rec.destination = WorkloadLabels.of(workload, self.state.config.trust_domain)
        rec.destination_service = workload.services[0] if workload.services else "unknown"
        decision = authorize_connection(
            self.state.policy,
            ConnectionAttrs(
                source=req.peer_identity,
                source_ip=req.peer_address[0],
                destination_ip=ip,
                destination_port=port,
                workload_namespace=workload.namespace,
                workload_name=workload.name,
                workload_labels=workload.label_map,
            ),
        )
        if not decision.allowed:
            await self._refuse(reply, rec, FLAG_UNAUTHORIZED, 401, decision.reason)
            return
        try:
            sock = DatagramSocket.connect(ip, port)
        except OSError as exc:
            await self._refuse(reply, rec, FLAG_UPSTREAM_CONNECT, 503, f"UDP socket to {ip}:{port}: {exc}")
            return
        try:
            tunnel = await reply.accept([CAPSULE_PROTOCOL])
            meter = self.telemetry.opened(rec)
            self.active += 1
            counters = FlowCounters(last_active=trio.current_time())
            try:
                ended, error = await self._carry(tunnel, sock, counters, meter)
            finally:
                self.active -= 1
            self.telemetry.closed(rec, meter, counters, ended, error)
        finally:
            sock.close()

    async def _refuse(
        self, reply: ServerReply, rec: ConnectionRecord, flag: str, status: int, reason: str
    ) -> None:
        self.telemetry.failed(rec, flag, reason)
        await reply.refuse(status, reason)

    async def _carry(
        self, tunnel: TunnelStream, sock: DatagramSocket, counters: FlowCounters, meter: FlowMeter
    ) -> tuple[str, str | None]:
        ended, error = "idle", None

        def on_drop(reason: str, count: int) -> None:
            self.telemetry.dropped(REPORTER, reason, count)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_socket_to_tunnel, sock, tunnel, counters)
                nursery.start_soon(
                    expire_when_idle,
                    counters,
                    self.limits.idle_timeout.total_seconds(),
                    nursery.cancel_scope,
                    meter,
                )
                await tunnel_to_socket(tunnel, sock.send_nowait, counters, on_drop, towards_client=False)
                ended = "client closed"
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            ended, error = "error", f"tunnel: {exc}"
        except CapsuleError as exc:
            ended, error = "error", f"client sent malformed capsules: {exc}"
        return ended, error


async def _socket_to_tunnel(sock: DatagramSocket, tunnel: TunnelStream, counters: FlowCounters) -> None:
    """The workload's replies into the tunnel. Read only as fast as the tunnel takes them: what the
    workload sends faster waits in (and overflows from) the socket's kernel buffer."""
    while True:
        batch = await sock.receive_batch()
        now = trio.current_time()
        payloads = [data for data, _ in batch]
        for data in payloads:
            counters.to_client(len(data), now)
        await tunnel.send_all(encode_batch(payloads))
