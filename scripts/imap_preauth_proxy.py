"""IMAP proxy for trying Thunderbird: logs in to the bridge itself, greets
the client with PREAUTH, then relays both ways and logs every line."""
import socket, sys, threading
listen, target, user, password, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
out = open(log, "a", buffering=1)
def pump(src, dst, tag):
    buf = b""
    try:
        while True:
            d = src.recv(65536)
            if not d:
                break
            dst.sendall(d)
            buf += d
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                out.write(f"{tag} {line[:300].decode('latin-1')}\n")
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen)); srv.listen(16)
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    b = socket.create_connection(("127.0.0.1", target))
    f = b.makefile("rb")
    f.readline()
    b.sendall(b"p0 LOGIN " + user.encode() + b" " + password.encode() + b"\r\n")
    l = f.readline()
    out.write(f"proxy login: {l!r}\n")
    c.sendall(b"* PREAUTH proxy logged in\r\n")
    threading.Thread(target=pump, args=(c, b, "C:"), daemon=True).start()
    threading.Thread(target=pump, args=(b, c, "S:"), daemon=True).start()
