// A CONNECT-UDP (RFC 9298) client on Node.js's own HTTP/2 stack (nghttp2), with its own capsule code
// (RFC 9297), for interop tests against a real meshd daemon's HBONE port.
// Usage: node node_connect_udp_client.js HOST PORT CERT KEY CA TARGET_IP TARGET_PORT COUNT [TARGET_IP TARGET_PORT COUNT ...]
// Opens one mTLS 1.3 + h2 connection, waits for the server's SETTINGS to enable extended CONNECT
// (RFC 8441), then per target one stream `:protocol connect-udp` with `:path` from RFC 9298's default
// template. It sends COUNT DATAGRAM capsules (context id 0) of different sizes with an unknown capsule
// between them (which the server must skip), decodes what comes back and checks every payload.
// Prints one JSON object: the server's settings and, per stream, :status, capsule-protocol and counts.
"use strict";
const { openSession } = require("./node_hbone_session");
const crypto = require("crypto");

const [host, port, certPath, keyPath, caPath, ...rest] = process.argv.slice(2);
const targets = [];
for (let i = 0; i + 2 < rest.length; i += 3) targets.push([rest[i], Number(rest[i + 1]), Number(rest[i + 2])]);

// QUIC variable-length integer (RFC 9000 section 16), written here rather than taken from meshd.
function varint(n) {
  if (n < 0x40) return Buffer.from([n]);
  if (n < 0x4000) { const b = Buffer.alloc(2); b.writeUInt16BE(n | 0x4000); return b; }
  if (n < 0x40000000) { const b = Buffer.alloc(4); b.writeUInt32BE((n | 0x80000000) >>> 0); return b; }
  throw new Error("varint too large for this test");
}
function readVarint(buf, pos) {
  if (pos >= buf.length) return null;
  const size = 1 << (buf[pos] >> 6);
  if (pos + size > buf.length) return null;
  let v = buf[pos] & 0x3f;
  for (let i = 1; i < size; i++) v = v * 256 + buf[pos + i];
  return [v, pos + size];
}
function capsule(type, value) { return Buffer.concat([varint(type), varint(value.length), value]); }
function datagram(payload) { return capsule(0, Buffer.concat([varint(0), payload])); }

function udpPath(ip, p) { return `/.well-known/masque/udp/${encodeURIComponent(ip)}/${p}/`; }

const session = openSession(host, port, certPath, keyPath, caPath);

function flow(ip, p, count) {
  return new Promise((resolve) => {
    const req = session.request({
      ":method": "CONNECT",
      ":protocol": "connect-udp",
      ":scheme": "https",
      ":authority": `${host}:${port}`, // a generic MASQUE client names the proxy here
      ":path": udpPath(ip, p),
      "capsule-protocol": "?1",
    });
    const sent = [];
    const result = { target: `${ip}:${p}`, status: null, capsule_protocol: null, sent: count, echoed: 0, mismatched: 0, skipped: 0 };
    let buf = Buffer.alloc(0);
    let body = "";
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      if (result.status !== 200) result.body = body;
      resolve(result);
      req.close();
    };
    req.on("response", (headers) => {
      result.status = headers[":status"];
      result.capsule_protocol = headers["capsule-protocol"] || null;
      if (result.status !== 200) return;
      sendBatch();
    });
    // WINDOW datagrams at a time, the next batch once all are back: UDP is lossy, and a burst larger
    // than the echo server's socket buffer would be dropped by the kernel, not by anything under test.
    const WINDOW = 25;
    const sendBatch = () => {
      const out = [];
      const end = Math.min(count, sent.length + WINDOW);
      for (let i = sent.length; i < end; i++) {
        const payload = crypto.randomBytes(1 + ((i * 389) % 1400));
        sent.push(payload);
        out.push(datagram(payload));
        if (i === 1) out.push(capsule(0x2a, Buffer.from("a capsule type meshd does not know")));
      }
      if (out.length) req.write(Buffer.concat(out));
    };
    req.on("data", (chunk) => {
      if (result.status !== 200) { body += chunk.toString("utf8"); return; }
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        const t = readVarint(buf, 0); if (!t) break;
        const l = readVarint(buf, t[1]); if (!l) break;
        const end = l[1] + l[0];
        if (end > buf.length) break;
        if (t[0] !== 0) { result.skipped++; buf = buf.subarray(end); continue; }
        const ctx = readVarint(buf, l[1]);
        const payload = buf.subarray(ctx[1], end);
        const expected = sent[result.echoed + result.mismatched];
        if (ctx[0] === 0 && expected && payload.equals(expected)) result.echoed++; else result.mismatched++;
        buf = buf.subarray(end);
      }
      if (result.echoed + result.mismatched >= count) finish();
      else if (result.echoed + result.mismatched === sent.length) sendBatch();
    });
    req.on("end", finish);
    req.on("error", (err) => { result.error = String(err); finish(); });
    req.on("close", finish);
    setTimeout(finish, 10000);
  });
}

session.on("remoteSettings", async (settings) => {
  if (session.started) return;
  session.started = true;
  const results = [];
  for (const [ip, p, count] of targets) results.push(await flow(ip, p, count));
  console.log(JSON.stringify({ enableConnectProtocol: settings.enableConnectProtocol, results }));
  session.close();
});
