"""The per-request pipeline, whatever HTTP version the client spoke: authorize -> route -> filter chain
-> send. One request/response model in (plugins.filters.HttpRequest), one out (HttpResponse, its body
still streaming).

Must never know: sockets, HTTP framing, tunnels to destinations. The upstream is a `Sender` (the waypoint
gives backends.Backends; tests give a fake), so the pipeline runs in memory with a fake sender.

Policy scope: a request is authorized against every workload of the destination service (in the
service's namespace); it must be allowed for each. So a policy naming one workload of a service (or
selecting it by label) applies to the whole service at the waypoint: the decision is taken before an
endpoint is chosen, as Istio's waypoint does for a policy that targets the service.

Once per change, not per request: the Router is compiled once per PolicySet, a service's workloads
listed once per Catalog (both are immutable values, swapped whole); a tunnel's L4 attributes are
built once per tunnel (admission.Tunnel).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import AsyncIterable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pluggy
import trio

from meshd import grpc
from meshd.discovery.catalog import Catalog, WorkloadEntry
from meshd.observe import dry_run
from meshd.observe.accesslog import FLAG_UNAUTHORIZED, RequestRecord, RequestTelemetry
from meshd.observe.tracecontext import extract
from meshd.observe.tracing import Tracer
from meshd.plugins.filters import (
    FilterContext,
    HttpRequest,
    HttpResponse,
    LocalResponse,
    RequestBody,
    RequestInfo,
    SendUpstream,
)
from meshd.policy.evaluate import Decision, DryRunResult, PolicySet, RequestAttrs, authorize_request
from meshd.waypoint.admission import Tunnel
from meshd.waypoint.http1 import set_trace_headers, trace_headers
from meshd.waypoint.router import (
    CompiledRoute,
    RouteChoice,
    Router,
    compile_router,
    no_route_response,
)

log = logging.getLogger("meshd.waypoint")

FORBIDDEN_BODY = b"RBAC: access denied\n"


def service_workloads(catalog: Catalog, service: str) -> list[WorkloadEntry | None]:
    """The workloads a request to `service` is authorized against ([None]: none, namespace-wide only)."""
    return [w for w in catalog.workloads if service in w.services] or [None]


def request_attrs(
    t: Tunnel, request: HttpRequest, workloads: list[WorkloadEntry | None]
) -> Iterator[RequestAttrs]:
    """What L7 authorization sees of the request, once per workload of the service."""
    hdrs: dict[str, str] = {}  # repeated fields joined with ", ", as Headers.get() does
    for k, v in request.headers.items():
        hdrs[k] = f"{hdrs[k]}, {v}" if k in hdrs else v
    target_port = t.port.target_port
    for w in workloads:
        yield RequestAttrs(
            t.connection_attrs(w, target_port), request.method, request.path, request.authority, hdrs
        )


class Sender(Protocol):
    def sender(self, t: Tunnel, choice: RouteChoice, rec: RequestRecord, info: RequestInfo) -> SendUpstream:
        """The upstream call of one request on the chosen route and backend."""
        ...


@dataclass
class Outcome:
    response: HttpResponse
    info: RequestInfo
    route: CompiledRoute | None = None
    ctxs: list[FilterContext] | None = None


class Pipeline:
    def __init__(
        self,
        policy: Callable[[], PolicySet],
        catalog: Callable[[], Catalog],
        backends: Sender,
        telemetry: RequestTelemetry,
        plugins: pluggy.PluginManager | None,
        tracer: Tracer | None = None,
    ) -> None:
        self.tracer = tracer or Tracer.disabled()
        self._policy = policy
        self._catalog = catalog
        self.backends = backends
        self.telemetry = telemetry
        self.plugins = plugins
        self._hook_errors: set[str] = set()
        # Derived from the policy / the catalog, rebuilt when either is swapped.
        self._policy_seen: PolicySet | None = None
        self._router = Router(())
        self._catalog_seen: Catalog | None = None
        self._workloads: dict[str, list[WorkloadEntry | None]] = {}

    @property
    def router(self) -> Router:
        policy = self._policy()
        if policy is not self._policy_seen:
            self._policy_seen = policy
            self._router = compile_router(policy)
        return self._router

    def begin(self, t: Tunnel, request: HttpRequest, protocol: str) -> RequestRecord:
        """The request's telemetry record; trace context set on the request."""
        headers = request.headers
        rec = RequestRecord(
            src=t.src,
            method=request.method,
            path=request.path,
            authority=request.authority,
            protocol=protocol,
            source_identity=t.source,
            source=t.source_labels,
            destination_service=t.service.key,
            user_agent=headers.get("user-agent"),
        )
        rec.grpc = grpc.is_grpc(headers.get("content-type"))
        rec.upstream_cluster = f"outbound|{t.port.port}||{t.service.key}"
        if self.tracer.enabled:
            # The request's own context wins; else the tunnel's (the client node's connection span).
            parent = extract(headers.get) or t.trace_parent
            trace_headers(headers)  # x-request-id when missing
            rec.trace = self.tracer.start(parent)
            assert rec.trace is not None
            set_trace_headers(headers, rec.trace)
            rec.trace_id = rec.trace.context.trace_id
        else:
            rec.trace_id = trace_headers(headers)
        rec.request_id = headers.get("x-request-id")
        return rec

    async def run(
        self, t: Tunnel, request: HttpRequest, rec: RequestRecord, body: AsyncIterable[bytes]
    ) -> Outcome:
        """Authorize, route, run the chain and the upstream. Returns the response to send."""
        info = RequestInfo(
            "", source_principal=t.source.principal, source_address=t.src, destination_service=t.service.key
        )
        decision = self.authorize(t, request)
        rec.dry_run = dry_run.record(self.telemetry.metrics, decision)
        if not decision.allowed:
            log.info(
                "request denied",
                extra={"reason": decision.reason, "path": request.path, "method": request.method},
            )
            info.flag(FLAG_UNAUTHORIZED)
            rec.error = decision.reason
            return Outcome(
                LocalResponse(403, body=FORBIDDEN_BODY, flag=FLAG_UNAUTHORIZED).to_response(), info
            )
        choice = self.match(request, t.service.key)
        if choice is None:
            local = await self._no_route(request, t.service.key)
            if local.flag:
                info.flag(local.flag)
            return Outcome(local.to_response(), info)
        route = choice.route
        chain = route.chain
        info.route = rec.route = route.name
        ctxs = chain.contexts(info)
        request.body = RequestBody(body, chain.buffer_limit)
        send = self.backends.sender(t, choice, rec, info)
        try:
            response = await chain.handle(request, send, info, ctxs)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the client went away: the front-end ends the connection
        except Exception as exc:  # a bug in the proxy: answer 500, keep serving
            log.exception("waypoint failed on %s %s", request.method, request.path)
            rec.error = repr(exc)
            response = LocalResponse(500, body=b"internal error\n").to_response()
        return Outcome(response, info, route, ctxs)

    async def finish(self, rec: RequestRecord, done: Outcome, access_log: bool) -> None:
        """Telemetry once the response went out: metrics, access log, filters' on_log, the hook."""
        rec.response_flags = list(done.info.response_flags)
        rec.attempts = done.info.upstream_attempts
        rec.wasm_failures = done.info.wasm_failures
        if rec.grpc and not rec.grpc_status:  # a trailers-only answer carries it in its headers
            response = done.response
            rec.grpc_status = (
                response.trailers.get("grpc-status") or response.headers.get("grpc-status") or ""
            )
        self.telemetry.access_log = access_log
        chain = done.route.chain if done.route is not None and done.ctxs is not None else None
        hooked = self.plugins is not None and bool(self.plugins.hook.meshd_access_log.get_hookimpls())
        record = self.telemetry.finished(rec, want_record=hooked or bool(chain))
        if record is None:
            return
        if chain is not None and done.ctxs is not None:
            await chain.log(done.ctxs, record)
        if hooked:
            await self._access_log_hook(record)

    # ---- authorization and routing (pure over the current policy and catalog) --------------------

    def _workloads_of(self, service: str) -> list[WorkloadEntry | None]:
        catalog = self._catalog()
        if catalog is not self._catalog_seen:
            self._catalog_seen = catalog
            self._workloads.clear()
        workloads = self._workloads.get(service)
        if workloads is None:
            workloads = self._workloads[service] = service_workloads(catalog, service)
        return workloads

    def authorize(self, t: Tunnel, request: HttpRequest) -> Decision:
        """Allowed only if allowed for every workload of the service (see the module docstring)."""
        policy = self._policy()
        decision = Decision(True, None, "no workload")
        verdicts: list[DryRunResult] = []
        for attrs in request_attrs(t, request, self._workloads_of(t.service.key)):
            decision = authorize_request(policy, attrs)
            verdicts += decision.dry_run
            if not decision.allowed:
                break
        if len(verdicts) > len(decision.dry_run):  # several workloads: one verdict per dry-run policy
            decision = dataclasses.replace(decision, dry_run=dry_run.merge(verdicts))
        return decision

    def match(self, request: HttpRequest, service: str) -> RouteChoice | None:
        return self.router.choose(request, service)

    # ---- hooks ----------------------------------------------------------------------------------

    async def _no_route(self, request: HttpRequest, service: str) -> LocalResponse:
        if self.plugins is not None:
            try:
                answer = self.plugins.hook.meshd_no_route(request=request, service=service)
                if inspect.isawaitable(answer):
                    answer = await answer
                if isinstance(answer, LocalResponse):
                    return answer
            except Exception:
                self._hook_failed("meshd_no_route")
        return no_route_response()

    async def _access_log_hook(self, record: dict[str, Any]) -> None:
        if self.plugins is None:
            return
        try:
            for result in self.plugins.hook.meshd_access_log(record=record):
                if inspect.isawaitable(result):
                    await result
        except Exception:
            self._hook_failed("meshd_access_log")

    def _hook_failed(self, hook: str) -> None:
        if hook not in self._hook_errors:  # logged once per hook, then only counted in the log level
            self._hook_errors.add(hook)
            log.exception("plugin hook %s failed (further failures are not logged)", hook)
