"""etcd's v3 JSON gateway and meshd's entries in it, as pure functions and one small state machine.

Must never know: sockets, trio, httpx, clocks. Requests come out as `(path, JSON body)`; responses go
in as parsed JSON (a unary call) or as the raw bytes of a watch stream (`WatchDecoder.feed`). Every
malformed input raises `EtcdProtocolError` (the server or the gateway misbehaved) or, for an answer
etcd meant as an error, `EtcdServerError` (with etcd's gRPC code). Nothing else escapes.

Rule 1: etcd is a rendezvous, never an authority. A `NodeEntry` read from etcd says only "node N may
be at HBONE address A, its catalog revision is R". meshd fetches that address's catalog over mutual
TLS, where the peer must prove node identity N; see meshd.discovery.peers.

Theory of operation: each node writes `<prefix>nodes/<node name>` = the JSON of its `NodeEntry`,
attached to a lease it keeps alive. `EtcdView` holds what the prefix listed and the watch reported,
and turns a listing (`reset`) or a batch of watch changes (`apply`) into `Seen` / `Gone` / `Ignored`
hints for the node, plus the revision a broken watch resumes from.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from meshd.identity.spiffe import InvalidSpiffeId, validate_trust_domain
from meshd.units import Address

ENTRY_VERSION = 1
NODES = "nodes/"  # under the prefix: one key per node
MAX_ENTRY_BYTES = 4096  # an entry is ~150 bytes; anything larger is not ours
MAX_WATCH_BUFFER = 8 << 20  # one watch message (etcd caps a request at 1.5 MiB by default)
ROLES = ("node", "waypoint")
_NODE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_REVISION = re.compile(r"^[0-9a-f]{1,64}$")
# gRPC status codes etcd answers with (google.golang.org/grpc/codes)
NOT_FOUND, OUT_OF_RANGE, UNAVAILABLE = 5, 11, 14


Mapping_ = dict[str, Any]


class EtcdProtocolError(ValueError):
    """The answer is not what etcd's v3 JSON gateway sends; the message says what was wrong."""


class EtcdServerError(Exception):
    """etcd answered with an error (no leader, lease not found, permission denied, ...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


class EntryError(ValueError):
    """A value under the prefix is not a usable meshd entry; the message says why."""


# ---- encoding ------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise EtcdProtocolError(f"{what} is not a base64 string: {text!r:.80}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EtcdProtocolError(f"{what} is not valid base64: {text!r:.80}") from None


def prefix_end(prefix: bytes) -> bytes:
    """The `range_end` that selects every key starting with `prefix` (etcd's clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


def _int(raw: Mapping_, key: str, default: int | None = None) -> int:
    """etcd's gateway writes int64 as strings ("7") and omits zero values."""
    value = raw.get(key)
    if value is None:
        if default is None:
            raise EtcdProtocolError(f"field {key!r} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise EtcdProtocolError(f"field {key!r} is not an integer: {value!r:.80}")
    try:
        return int(value)
    except ValueError:
        raise EtcdProtocolError(f"field {key!r} is not an integer: {value!r:.80}") from None


def _object(raw: object, what: str) -> Mapping_:
    if not isinstance(raw, dict):
        raise EtcdProtocolError(f"{what} is not a JSON object: {raw!r:.80}")
    return raw


# ---- requests: (path, body) ----------------------------------------------------------------------


Request = tuple[str, dict[str, Any]]


def authenticate(name: str, password: str) -> Request:
    return "/v3/auth/authenticate", {"name": name, "password": password}


def grant(ttl: int) -> Request:
    return "/v3/lease/grant", {"TTL": str(ttl)}


def keepalive(lease: int) -> Request:
    return "/v3/lease/keepalive", {"ID": str(lease)}


def revoke(lease: int) -> Request:
    return "/v3/lease/revoke", {"ID": str(lease)}


def put(key: bytes, value: bytes, lease: int) -> Request:
    return "/v3/kv/put", {"key": b64(key), "value": b64(value), "lease": str(lease)}


def range_prefix(prefix: bytes) -> Request:
    return "/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}


def watch_create(prefix: bytes, start_revision: int) -> Request:
    return "/v3/watch", {
        "create_request": {
            "key": b64(prefix),
            "range_end": b64(prefix_end(prefix)),
            "start_revision": str(start_revision),
        }
    }


# ---- unary responses -----------------------------------------------------------------------------


def check_error(raw: object) -> Mapping_:
    """The response object, or EtcdServerError if it is an error answer."""
    obj = _object(raw, "response")
    if "error" in obj or ("code" in obj and "message" in obj):
        err = obj.get("error")
        if isinstance(err, dict):  # a watch stream's error: {"error": {"grpc_code": .., "message": ..}}
            obj = err
        code = obj.get("code", obj.get("grpc_code", 2))
        message = obj.get("message", err)
        raise EtcdServerError(code if isinstance(code, int) else 2, str(message)[:300])
    return obj


def header_revision(obj: Mapping_) -> int:
    return _int(_object(obj.get("header"), "header"), "revision", 0)


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int  # seconds; 0 from a keepalive = the lease is gone


def parse_grant(raw: object) -> Lease:
    obj = check_error(raw)
    lease = Lease(_int(obj, "ID"), _int(obj, "TTL", 0))
    if lease.ttl <= 0:
        raise EtcdProtocolError(f"lease grant without a TTL: {obj.get('error') or obj!r:.120}")
    return lease


def parse_keepalive(raw: object) -> Lease:
    """A keepalive answer (the gateway wraps it in "result"); ttl 0 means the lease expired."""
    obj = check_error(raw)
    result = _object(obj.get("result", obj), "keepalive result")
    return Lease(_int(result, "ID", 0), _int(result, "TTL", 0))


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Listing:
    revision: int  # the store's revision the listing was taken at
    kvs: tuple[KeyValue, ...]


def _kv(raw: object, deleted: bool = False) -> KeyValue:
    kv = _object(raw, "kv")
    value = b"" if deleted else unb64(kv.get("value", ""), "value")
    return KeyValue(unb64(kv.get("key"), "key"), value, _int(kv, "mod_revision", 0))


def parse_range(raw: object) -> Listing:
    obj = check_error(raw)
    kvs = obj.get("kvs", [])
    if not isinstance(kvs, list):
        raise EtcdProtocolError(f"kvs is not a list: {kvs!r:.80}")
    return Listing(header_revision(obj), tuple(_kv(kv) for kv in kvs))


def parse_authenticate(raw: object) -> str:
    """The token to send as `Authorization` on every later request."""
    token = check_error(raw).get("token")
    if not isinstance(token, str) or not token or len(token) > 4096 or not token.isprintable():
        raise EtcdProtocolError(f"authenticate answered without a usable token: {token!r:.80}")
    return token


def parse_put(raw: object) -> int:
    return header_revision(check_error(raw))


# ---- the watch stream ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    kind: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchCreated:
    revision: int


@dataclass(frozen=True, slots=True)
class WatchChanges:
    revision: int  # the header revision: every change up to it has been delivered
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class WatchCompacted:
    """The revision asked for is gone: list again, then watch from the listing's revision + 1."""

    compact_revision: int


@dataclass(frozen=True, slots=True)
class WatchCanceled:
    reason: str


WatchEvent = WatchCreated | WatchChanges | WatchCompacted | WatchCanceled


def parse_watch_message(raw: object) -> WatchEvent:
    obj = check_error(raw)
    result = _object(obj.get("result"), "watch result")
    revision = header_revision(result)
    if result.get("canceled"):
        compact = _int(result, "compact_revision", 0)
        if compact > 0:
            return WatchCompacted(compact)
        return WatchCanceled(str(result.get("cancel_reason", "canceled by the server"))[:300])
    if result.get("created"):
        return WatchCreated(revision)
    events = result.get("events", [])
    if not isinstance(events, list):
        raise EtcdProtocolError(f"events is not a list: {events!r:.80}")
    changes = []
    for e in events:
        ev = _object(e, "event")
        kind = ev.get("type", "PUT")  # PUT is etcd's zero value: the gateway leaves it out
        if kind not in ("PUT", "DELETE"):
            raise EtcdProtocolError(f"unknown event type {kind!r:.40}")
        changes.append(Change("put" if kind == "PUT" else "delete", _kv(ev.get("kv"), kind == "DELETE")))
    return WatchChanges(revision, tuple(changes))


class WatchDecoder:
    """Bytes of a streamed `/v3/watch` response -> watch events. The gateway writes one JSON object
    per message, newline-separated; chunks may cut anywhere (even inside a UTF-8 sequence)."""

    def __init__(self, limit: int = MAX_WATCH_BUFFER) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[WatchEvent]:
        self._buffer += data
        out = []
        while (nl := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:nl]).strip()
            del self._buffer[: nl + 1]
            if line:
                out.append(parse_watch_message(_json(line)))
        if len(self._buffer) > self._limit:
            raise EtcdProtocolError(f"watch message over {self._limit} bytes without a newline")
        return out

    def close(self) -> list[WatchEvent]:
        """The stream ended: a last message without its newline still counts."""
        rest, self._buffer = bytes(self._buffer).strip(), bytearray()
        return [parse_watch_message(_json(rest))] if rest else []


def _json(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EtcdProtocolError(f"not JSON: {exc}") from None


# ---- meshd's entries -----------------------------------------------------------------------------


def default_prefix(trust_domain: str) -> str:
    return f"/meshd/{trust_domain}/"


def node_key(prefix: str, node: str) -> bytes:
    return f"{prefix}{NODES}{node}".encode()


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """What a node writes about itself: where to fetch its catalog, and which revision that is."""

    trust_domain: str
    node: str
    role: str
    hbone: Address
    revision: str
    version: int = ENTRY_VERSION

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": self.version,
                "td": self.trust_domain,
                "node": self.node,
                "role": self.role,
                "hbone": str(self.hbone),
                "rev": self.revision,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()


def decode_entry(key: bytes, value: bytes, *, prefix: str, trust_domain: str) -> NodeEntry:
    """Parse one value under `<prefix>nodes/`; EntryError with the reason when it is unusable.
    The entry's node name must be the key's last segment (a key names whose entry it is)."""
    try:
        key_text = key.decode()
    except UnicodeDecodeError:
        raise EntryError("key is not UTF-8") from None
    base = prefix + NODES
    if not key_text.startswith(base):
        raise EntryError(f"key is not under {base}")
    key_node = key_text[len(base) :]
    if len(value) > MAX_ENTRY_BYTES:
        raise EntryError(f"entry is {len(value)} bytes, over the {MAX_ENTRY_BYTES} limit")
    try:
        raw = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise EntryError("entry is not JSON") from None
    if not isinstance(raw, dict):
        raise EntryError("entry is not a JSON object")
    version = raw.get("v")
    if version != ENTRY_VERSION or isinstance(version, bool):
        raise EntryError(f"entry version {version!r:.20}, this meshd reads {ENTRY_VERSION}")
    fields = {k: raw.get(k) for k in ("td", "node", "role", "hbone", "rev")}
    missing = [k for k, v in fields.items() if not isinstance(v, str)]
    if missing:
        raise EntryError(f"entry lacks string field(s) {', '.join(missing)}")
    td, node, role, hbone, rev = (str(fields[k]) for k in ("td", "node", "role", "hbone", "rev"))
    try:
        validate_trust_domain(td)
    except InvalidSpiffeId as exc:
        raise EntryError(f"trust domain {td!r:.80} is not valid: {exc}") from None
    if td != trust_domain:
        raise EntryError(f"entry is for trust domain {td!r:.80}, not {trust_domain!r}")
    if not _NODE.match(node):
        raise EntryError(f"node name {node!r:.80} is not valid")
    if node != key_node:
        raise EntryError(f"entry names node {node!r} but sits under key {key_node!r:.80}")
    if role not in ROLES:
        raise EntryError(f"role {role!r:.40} is not one of {', '.join(ROLES)}")
    try:
        address = Address.parse(hbone)
    except ValueError as exc:
        raise EntryError(f"hbone {hbone!r:.80}: {exc}") from None
    if address.host in ("0.0.0.0", "::", "") or address.port == 0:
        raise EntryError(f"hbone {hbone!r:.80} is not an address a peer can dial")
    if not _REVISION.match(rev):
        raise EntryError(f"catalog revision {rev!r:.80} is not a hex digest")
    return NodeEntry(td, node, role, address, rev)


# ---- the view: what etcd says, as hints ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    node: str
    address: Address
    revision: str


@dataclass(frozen=True, slots=True)
class Gone:
    node: str


@dataclass(frozen=True, slots=True)
class Ignored:
    key: str
    reason: str


Hint = Seen | Gone | Ignored


@dataclass
class EtcdView:
    """The entries under the prefix, as last listed and watched. Our own node's entry is skipped."""

    prefix: str
    trust_domain: str
    own_node: str
    entries: dict[str, NodeEntry] = field(default_factory=dict)  # node -> entry
    ignored: dict[str, str] = field(default_factory=dict)  # key -> why
    revision: int = 0  # every change up to this revision has been applied

    def reset(self, listing: Listing) -> list[Hint]:
        """A full listing: hints for what is new or changed, and `Gone` for what is no longer there."""
        before = dict(self.entries)
        self.entries.clear()
        self.ignored.clear()
        hints: list[Hint] = []
        for kv in listing.kvs:
            hints += self._put(kv, before)
        hints += [Gone(n) for n in sorted(before) if n not in self.entries]
        self.revision = max(self.revision, listing.revision)
        return hints

    def apply(self, event: WatchChanges) -> list[Hint]:
        hints: list[Hint] = []
        for ch in event.changes:
            if ch.kv.mod_revision and ch.kv.mod_revision <= self.revision:
                continue  # already seen (a resumed watch may repeat the tail)
            if ch.kind == "put":
                hints += self._put(ch.kv, self.entries)
            else:
                hints += self._delete(ch.kv.key)
        # Mod revisions, not the header's: a resumed watch then repeats at worst what `apply` skips.
        self.revision = max(self.revision, *(c.kv.mod_revision for c in event.changes))
        return hints

    def _put(self, kv: KeyValue, before: dict[str, NodeEntry]) -> list[Hint]:
        key = kv.key.decode(errors="replace")
        if not key.startswith(self.prefix + NODES):
            return []  # another use of the prefix (not ours to judge)
        try:
            entry = decode_entry(kv.key, kv.value, prefix=self.prefix, trust_domain=self.trust_domain)
        except EntryError as exc:
            gone = self._delete(kv.key)  # a node's key now holding junk: what it said no longer holds
            self.ignored[key] = str(exc)
            return [*gone, Ignored(key, str(exc))]
        self.ignored.pop(key, None)
        if entry.node == self.own_node:
            return []
        old = before.get(entry.node)
        self.entries[entry.node] = entry
        if old == entry and before is not self.entries:
            return []  # unchanged across a re-list
        return [Seen(entry.node, entry.hbone, entry.revision)]

    def _delete(self, key: bytes) -> list[Hint]:
        text = key.decode(errors="replace")
        self.ignored.pop(text, None)
        node = text.removeprefix(self.prefix + NODES)
        if node in self.entries and text.startswith(self.prefix + NODES):
            del self.entries[node]
            return [Gone(node)]
        return []
