// The HBONE connection both Node.js interop clients open: mTLS 1.3 + h2 to HOST:PORT (no SNI: HOST is an
// IP), the server's SPIFFE identity left to the test (it checks the SAN); a connection error prints
// {"error": ...} and exits 2.
"use strict";
const http2 = require("http2");
const fs = require("fs");

// mTLS 1.3 with ALPN h2, as HBONE wants it, from PEM files.
function tlsOptions(certPath, keyPath, caPath) {
  return {
    cert: fs.readFileSync(certPath),
    key: fs.readFileSync(keyPath),
    ca: fs.readFileSync(caPath),
    minVersion: "TLSv1.3",
    maxVersion: "TLSv1.3",
    ALPNProtocols: ["h2"],
    checkServerIdentity: () => undefined, // identities are SPIFFE URIs; the test checks the SAN
  };
}

function openSession(host, port, certPath, keyPath, caPath) {
  const session = http2.connect(`https://${host}:${port}`, tlsOptions(certPath, keyPath, caPath));
  session.on("error", (err) => {
    console.log(JSON.stringify({ error: String(err) }));
    process.exit(2);
  });
  return session;
}

module.exports = { openSession, tlsOptions };
