// An HBONE client built on Node.js's own HTTP/2 stack (nghttp2), for interop tests of meshd's server.
// Usage: node node_hbone_client.js PORT CERT KEY CA
// Prints one JSON object: the peer's SPIFFE SAN, the TLS version/ALPN, and per-request results.
"use strict";
const http2 = require("http2");
const fs = require("fs");
const crypto = require("crypto");

const [port, certPath, keyPath, caPath] = process.argv.slice(2);
const session = http2.connect(`https://127.0.0.1:${port}`, {
  cert: fs.readFileSync(certPath),
  key: fs.readFileSync(keyPath),
  ca: fs.readFileSync(caPath),
  minVersion: "TLSv1.3",
  maxVersion: "TLSv1.3",
  ALPNProtocols: ["h2"],
  checkServerIdentity: () => undefined, // identities are SPIFFE URIs; the caller checks the SAN
});
session.on("error", (err) => {
  console.log(JSON.stringify({ error: String(err) }));
  process.exit(2);
});

function connect(authority, payload) {
  return new Promise((resolve) => {
    const req = session.request({
      ":method": "CONNECT",
      ":authority": authority,
      forwarded: 'for="127.0.0.1:40000"',
      traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    });
    const result = { authority, status: null, sent: payload.length, received: 0 };
    const hash = crypto.createHash("sha256");
    req.on("response", (headers) => { result.status = headers[":status"]; });
    req.on("data", (chunk) => { hash.update(chunk); result.received += chunk.length; });
    req.on("end", () => {
      result.echo_ok = hash.digest("hex") === crypto.createHash("sha256").update(payload).digest("hex");
      resolve(result);
    });
    req.on("error", (err) => { result.error = String(err); resolve(result); });
    req.on("close", () => resolve(result));
    // Write in pieces, then half-close: the echo comes back and ends with END_STREAM.
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
  const tls = { version: session.socket.getProtocol(), alpn: session.alpnProtocol, cipher: session.socket.getCipher().standardName };
  const payload = crypto.randomBytes(8 * 1024 * 1024 + 123);
  const results = await Promise.all([
    connect("10.0.0.1:80", payload),
    connect("10.0.0.2:81", payload.subarray(0, 1000)),
    connect("not-an-ip:80", Buffer.alloc(0)),
    connect("10.0.0.9:9", Buffer.from("denied")),
  ]);
  console.log(JSON.stringify({ san, tls, results }));
  session.close();
});
