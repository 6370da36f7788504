// A double-HBONE client on Node.js's own HTTP/2 and TLS stacks, speaking Istio ztunnel's format (istio/ztunnel
// src/proxy/outbound.rs: build_request_through_gateway, proxy_to_double_hbone, create_hbone_request,
// build_forwarded; src/proxy.rs: X_FORWARDED_NETWORK_HEADER), for interop tests against a meshd gateway.
// Usage: node node_ztunnel_double_hbone.js GW_HOST GW_PORT CERT KEY CA HOSTNAME PORT NETWORK FOR BYTES
// - outer: mTLS 1.3 + h2 to the gateway with the client *workload's* certificate (ztunnel's pool key is the
//   source workload identity), CONNECT :authority HOSTNAME:PORT (HboneAddress::SvcHostname) with baggage,
//   forwarded: for="FOR";host=HOSTNAME, traceparent (no x-forwarded-network: send_hbone_request);
// - inner: mTLS 1.3 + h2 inside that stream, same certificate, the same CONNECT plus
//   x-forwarded-network: NETWORK; then BYTES random bytes, half-close, and hash what comes back.
// Prints one JSON object: each layer's server SAN and :status (and refusal body), and the echo result.
"use strict";
const http2 = require("http2");
const tls = require("tls");
const crypto = require("crypto");
const { tlsOptions } = require("./node_hbone_session");

const [host, port, certPath, keyPath, caPath, hostname, svcPort, network, forwardedFor, bytes] =
  process.argv.slice(2);
const authority = `${hostname}:${svcPort}`;
const creds = tlsOptions(certPath, keyPath, caPath); // both layers: the client workload's certificate
// ztunnel's header order (create_hbone_request): baggage, forwarded, traceparent[, x-forwarded-network].
const hboneHeaders = {
  ":method": "CONNECT",
  ":authority": authority,
  baggage: "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client,service.name=client,service.version=v1",
  forwarded: `for="${forwardedFor}";host=${hostname}`,
  traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
};
const out = { authority, outer: {}, inner: {} };

function finish(code) {
  console.log(JSON.stringify(out));
  process.exit(code);
}

function fail(where, err) {
  out.error = `${where}: ${err}`;
  finish(2);
}

// Read a refused CONNECT's body (the reason), then report.
function refused(stream, layer) {
  const chunks = [];
  stream.on("data", (c) => chunks.push(c));
  stream.on("close", () => {
    layer.body = Buffer.concat(chunks).toString("utf8");
    finish(0);
  });
}

const outer = http2.connect(`https://${host}:${port}`, creds);
outer.on("error", (e) => fail("outer session", e));
outer.on("connect", () => {
  out.outer.san = outer.socket.getPeerCertificate().subjectaltname;
  out.outer.tls = outer.socket.getProtocol();
  const stream = outer.request({ ...hboneHeaders });
  stream.on("error", (e) => fail("outer stream", e));
  stream.on("response", (headers) => {
    out.outer.status = headers[":status"];
    if (out.outer.status !== 200) return refused(stream, out.outer);
    inner(stream);
  });
});

function inner(outerStream) {
  // proxy_to_double_hbone: `connector.connect(upgraded)` over the outer H2 stream, not pooled.
  const socket = tls.connect({ ...creds, socket: outerStream });
  socket.on("error", (e) => fail("inner tls", e));
  const session = http2.connect(`https://${authority}`, { createConnection: () => socket });
  session.on("error", (e) => fail("inner session", e));
  session.on("connect", () => {
    out.inner.san = socket.getPeerCertificate().subjectaltname;
    out.inner.tls = socket.getProtocol();
    const stream = session.request({ ...hboneHeaders, "x-forwarded-network": network });
    stream.on("error", (e) => fail("inner stream", e));
    stream.on("response", (headers) => {
      out.inner.status = headers[":status"];
      if (out.inner.status !== 200) return refused(stream, out.inner);
      roundTrip(stream, session);
    });
  });
}

function roundTrip(stream, session) {
  const payload = crypto.randomBytes(Number(bytes));
  const hash = crypto.createHash("sha256");
  out.sent = payload.length;
  out.received = 0;
  stream.on("data", (chunk) => {
    hash.update(chunk);
    out.received += chunk.length;
  });
  stream.on("end", () => {
    out.echo_ok = hash.digest("hex") === crypto.createHash("sha256").update(payload).digest("hex");
    // Close as ztunnel does when the copy ends (drain: GOAWAY inside, then the outer stream and session).
    session.close(() => outer.close(() => finish(0)));
  });
  const piece = 64 * 1024;
  let off = 0;
  const pump = () => {
    while (off < payload.length) {
      const ok = stream.write(payload.subarray(off, off + piece));
      off += piece;
      if (!ok) {
        stream.once("drain", pump);
        return;
      }
    }
    stream.end();
  };
  pump();
}
