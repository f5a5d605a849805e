"""An SMTP "receiver" that accepts TCP connections and never says a word:
the stalled smarthost. stall_smtp.py PORT OUTDIR (OUTDIR unused, for the
same arguments as smarthost.py). Prints "ready"; runs until killed. Real
sockets, not a mock: the gateway's timeouts are what is under test."""
import socket
import sys

held = []
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    held.append(conn)
