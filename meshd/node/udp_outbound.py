"""Node outbound for UDP: one UDP socket per `[[upstream]] protocol = "udp"`; each client (address,
port) is a flow with its own connect-udp tunnel to an endpoint of the service, ended after
`udp.idle_timeout` without a datagram either way.

Must never know: what the datagrams carry; TCP.

The listener task only reads the socket and hands each datagram to its flow's bounded queue: it never
waits on a flow, so one slow or still-opening flow cannot stall the others. A new client gets a flow
only while the listener holds fewer than `udp.max_flows` flows and its IP fewer than
`udp.max_flows_per_client`; otherwise its datagrams are dropped and counted (`flow_limit`). A flow
whose tunnel could not be opened (no endpoint, policy refusal, peer down) stays in the table for
FAILED_HOLD seconds dropping its client's datagrams (`flow_failed`), so a client that keeps sending
does not make one CONNECT per datagram. Every flow lives in the listener's nursery: stopping the
upstream (drain, or a reload removing it) ends them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from meshd.config.model import UdpConfig, UpstreamConfig
from meshd.dataplane.proxied import Refused
from meshd.hbone.capsule import CapsuleError
from meshd.hbone.stream import TunnelStream
from meshd.listeners import ListenError
from meshd.node.outbound import Outbound, source_identity
from meshd.node.udp import (
    BATCH_BYTES,
    LISTENER_RECEIVE_BUFFER,
    DatagramSocket,
    encode_batch,
    expire_when_idle,
    tunnel_to_socket,
)
from meshd.observe.accesslog import (
    ConnectionRecord,
    source_of,
)
from meshd.observe.udp import (
    DROP_FLOW_FAILED,
    DROP_FLOW_LIMIT,
    DROP_QUEUE_FULL,
    FlowCounters,
    FlowMeter,
    UdpTelemetry,
)
from meshd.units import Address

log = logging.getLogger("meshd.outbound.udp")

FAILED_HOLD = 1.0
REPORTER = "source"


@dataclass
class UdpFlow:
    client: tuple[str, int]
    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    counters: FlowCounters = field(default_factory=FlowCounters)
    failed: bool = False


@dataclass(frozen=True, slots=True)
class UdpUpstreamStatistics:
    flows: int
    clients: int


class UdpUpstream:
    """The listener of one UDP upstream, and its flows."""

    def __init__(self, outbound: Outbound, telemetry: UdpTelemetry, up: UpstreamConfig):
        self.outbound = outbound
        self.telemetry = telemetry
        self.up = up
        self.flows: dict[tuple[str, int], UdpFlow] = {}
        self._per_client: Counter[str] = Counter()
        self.address: tuple[str, int] | None = None

    @property
    def limits(self) -> UdpConfig:
        """The `[udp]` settings in force (a reload applies them to the flows opened after it)."""
        return self.outbound.state.config.udp

    def statistics(self) -> UdpUpstreamStatistics:
        return UdpUpstreamStatistics(flows=len(self.flows), clients=len(self._per_client))

    async def serve(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive on the upstream's UDP address until cancelled; every flow ends with it."""
        up = self.up
        try:
            sock = DatagramSocket.bind(up.listen.host, up.listen.port, LISTENER_RECEIVE_BUFFER)
        except OSError as exc:
            raise ListenError(
                "[[upstream]] listen", up.listen, exc, f"{up.service_key}:{up.port}/udp"
            ) from exc
        self.address = sock.address
        log.info(
            "udp upstream listening",
            extra={"listen": str(up.listen), "service": f"{up.service_key}:{up.port}"},
        )
        try:
            async with trio.open_nursery() as flows:
                task_status.started(self.address)
                while True:
                    batch = await sock.receive_batch()
                    now = trio.current_time()
                    for data, client in batch:
                        self._offer(data, client, now, sock, flows)
        finally:
            sock.close()

    def _offer(
        self, data: bytes, client: tuple[str, int], now: float, sock: DatagramSocket, flows: trio.Nursery
    ) -> None:
        flow = self.flows.get(client)
        if flow is None:
            if len(self.flows) >= self.limits.max_flows or (
                self._per_client[client[0]] >= self.limits.max_flows_per_client
            ):
                self.telemetry.dropped(REPORTER, DROP_FLOW_LIMIT)
                return
            send, receive = trio.open_memory_channel[bytes](self.limits.queue_packets)
            flow = self.flows[client] = UdpFlow(client, send, receive)
            flow.counters.last_active = now
            self._per_client[client[0]] += 1
            flows.start_soon(self._run, flow, sock)
        if flow.failed:
            flow.counters.dropped += 1
            self.telemetry.dropped(REPORTER, DROP_FLOW_FAILED)
            return
        try:
            flow.send.send_nowait(data)
        except trio.WouldBlock:
            flow.counters.dropped += 1
            self.telemetry.dropped(REPORTER, DROP_QUEUE_FULL)
            return
        flow.counters.from_client(len(data), now)

    async def _run(self, flow: UdpFlow, sock: DatagramSocket) -> None:
        try:
            await self._flow(flow, sock)
        except Exception:  # one flow's bug must not end the listener and every other flow
            log.exception("udp flow from %s failed", Address(*flow.client))
        finally:
            flow.send.close()
            flow.receive.close()
            del self.flows[flow.client]
            self._per_client[flow.client[0]] -= 1
            if not self._per_client[flow.client[0]]:
                del self._per_client[flow.client[0]]

    async def _flow(self, flow: UdpFlow, sock: DatagramSocket) -> None:
        up, state = self.up, self.outbound.state
        client = str(Address(*flow.client))
        source = source_identity(state, up)
        rec = ConnectionRecord(
            reporter=REPORTER,
            src=client,
            dst=f"{up.service_key}:{up.port}",
            source_identity=source,
            source=source_of(state.catalog, source, client),
            destination_service=up.service_key,
            protocol="udp",
        )
        try:
            tunnel = await self.outbound.open_tunnel(rec, source, up, client, udp=True)
        except Refused as refused:
            await self._fail(flow, rec, refused.flag or "-", refused.reason)
            return
        async with tunnel:
            meter = self.telemetry.opened(rec)
            ended, error = await self._carry(flow, tunnel, sock, meter)
        self.telemetry.closed(rec, meter, flow.counters, ended, error)

    async def _carry(
        self, flow: UdpFlow, tunnel: TunnelStream, sock: DatagramSocket, meter: FlowMeter
    ) -> tuple[str, str | None]:
        """Datagrams both ways until idle, the peer ends the stream, or an error. (why it ended, error)."""
        ended, error = "idle", None

        def deliver(payload: bytes) -> str | None:
            return sock.send_nowait(payload, flow.client)

        def on_drop(reason: str, count: int) -> None:
            self.telemetry.dropped(REPORTER, reason, count)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_to_tunnel, flow.receive, tunnel)
                nursery.start_soon(
                    expire_when_idle,
                    flow.counters,
                    self.limits.idle_timeout.total_seconds(),
                    nursery.cancel_scope,
                    meter,
                )
                await tunnel_to_socket(tunnel, deliver, flow.counters, on_drop, towards_client=True)
                ended = "peer closed"
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            ended, error = "error", f"tunnel: {exc}"
        except CapsuleError as exc:
            ended, error = "error", f"peer sent malformed capsules: {exc}"
        return ended, error

    async def _fail(self, flow: UdpFlow, rec: ConnectionRecord, flag: str, reason: str) -> None:
        flow.failed = True
        queued = flow.receive.statistics().current_buffer_used
        if queued:
            flow.counters.dropped += queued
            self.telemetry.dropped(REPORTER, DROP_FLOW_FAILED, queued)
        self.telemetry.failed(rec, flag, reason)
        await trio.sleep(FAILED_HOLD)  # the client's next datagrams are dropped, not a CONNECT each


async def _to_tunnel(receive: trio.MemoryReceiveChannel[bytes], tunnel: TunnelStream) -> None:
    """Queued datagrams into the tunnel as capsules, as many per write as are waiting."""
    while True:
        batch = [await receive.receive()]
        size = len(batch[0])
        while size < BATCH_BYTES:
            try:
                payload = receive.receive_nowait()
            except trio.WouldBlock:
                break
            batch.append(payload)
            size += len(payload)
        await tunnel.send_all(encode_batch(batch))
