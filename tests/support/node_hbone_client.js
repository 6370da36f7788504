// An HBONE client on Node.js's own HTTP/2 stack (nghttp2), for interop tests against a real meshd daemon.
// Usage: node node_hbone_client.js HOST PORT CERT KEY CA AUTHORITY BYTES [AUTHORITY BYTES ...]
// Opens one mTLS 1.3 + h2 connection (no SNI: HOST is an IP) and, concurrently, one CONNECT stream per
// AUTHORITY carrying BYTES random bytes, then half-closes it. Prints one JSON object: the server's SAN,
// TLS parameters, and per stream the :status, the bytes sent/received and whether the echo matched.
"use strict";
const { openSession } = require("./node_hbone_session");
const crypto = require("crypto");

const [host, port, certPath, keyPath, caPath, ...rest] = process.argv.slice(2);
const streams = [];
for (let i = 0; i + 1 < rest.length; i += 2) streams.push([rest[i], Number(rest[i + 1])]);

const session = openSession(host, port, certPath, keyPath, caPath);

function connect(authority, payload) {
  return new Promise((resolve) => {
    const req = session.request({
      ":method": "CONNECT",
      ":authority": authority,
      forwarded: 'for="192.0.2.7:40000"',
      traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    });
    const result = { authority, status: null, sent: payload.length, received: 0, body: "" };
    const hash = crypto.createHash("sha256");
    const head = [];
    req.on("response", (headers) => { result.status = headers[":status"]; });
    req.on("data", (chunk) => {
      hash.update(chunk);
      result.received += chunk.length;
      if (result.received <= 4096) head.push(chunk);
    });
    const done = () => {
      if (result.echo_ok === undefined) {
        result.echo_ok = hash.digest("hex") === crypto.createHash("sha256").update(payload).digest("hex");
        if (result.status !== 200) result.body = Buffer.concat(head).toString("utf8");
      }
      resolve(result);
    };
    req.on("end", done);
    req.on("error", (err) => { result.error = String(err); done(); });
    req.on("close", done);
    const piece = 64 * 1024;
    let off = 0;
    const pump = () => {
      while (off < payload.length) {
        const ok = req.write(payload.subarray(off, off + piece));
        off += piece;
        if (!ok) { req.once("drain", pump); return; }
      }
      req.end();
    };
    pump();
  });
}

session.on("connect", async () => {
  const san = session.socket.getPeerCertificate().subjectaltname;
  const sock = session.socket;
  const tls = { version: sock.getProtocol(), alpn: session.alpnProtocol, cipher: sock.getCipher().standardName };
  const results = await Promise.all(streams.map(([a, n]) => connect(a, crypto.randomBytes(n))));
  console.log(JSON.stringify({ san, tls, results }));
  session.close();
});
