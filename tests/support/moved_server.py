"""A LATSSIAM server that answers every SEND with `35 Mailbox moved HOST`
(a hostile or confused contact server), over TLS with the given certificate.

Usage: moved_server.py PORT CERT KEY HOST
Prints "ready" once listening.
"""
import socket
import ssl
import sys
import threading

port, cert, key, host = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
listener = socket.create_server(("127.0.0.1", port))
print("ready", flush=True)


def serve(conn):
    try:
        with ctx.wrap_socket(conn, server_side=True) as s:
            f = s.makefile("rb")
            for line in f:
                if line.startswith(b"SEND "):
                    s.sendall(b"35 Mailbox moved " + host.encode() + b"\r\n")
                elif line.startswith(b"QUIT"):
                    return
    except (OSError, ssl.SSLError):
        pass


while True:
    c, _ = listener.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
