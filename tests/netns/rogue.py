"""A rogue announcer: a plain zeroconf registration of `_meshd._tcp.local.` with a well-formed TXT,
and a TLS listener on the announced port whose certificate claims a node identity of the right trust
domain but is signed by a CA the mesh does not trust. Run: python rogue.py IP NODE CERT_DIR."""

from __future__ import annotations

import signal
import socket
import ssl
import sys
import threading

from zeroconf import IPVersion, ServiceInfo, Zeroconf


def main() -> None:
    ip, node, cert_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{cert_dir}/cert.pem", f"{cert_dir}/key.pem")
    ctx.set_alpn_protocols(["h2"])
    listener = socket.create_server((ip, 15008))

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"not a catalog")
            except OSError:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    zc = Zeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    txt = {"v": "1", "td": "home.arpa", "role": "node", "node": node, "port": "15008", "rev": "deadbeef"}
    info = ServiceInfo(
        "_meshd._tcp.local.",
        f"{node}._meshd._tcp.local.",
        port=15008,
        properties=txt,
        server=f"{node}.local.",
        parsed_addresses=[ip],
    )
    zc.register_service(info)
    print("announced", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    zc.unregister_service(info)
    zc.close()


if __name__ == "__main__":
    main()
