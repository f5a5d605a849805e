"""SMTP proxy for trying Thunderbird's sending: logs in to the bridge's
submission listener itself (EHLO, AUTH PLAIN), hands the client the
bridge's greeting, then relays both ways and logs every line."""
import base64, socket, sys, threading
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
def reply(f):
    lines = []
    while True:
        l = f.readline()
        lines.append(l)
        if len(l) < 4 or l[3:4] != b"-":
            return lines
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen)); srv.listen(16)
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    b = socket.create_connection(("127.0.0.1", target))
    f = b.makefile("rb")
    greeting = reply(f)
    b.sendall(b"EHLO proxy\r\n"); reply(f)
    token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    b.sendall(b"AUTH PLAIN " + token + b"\r\n")
    out.write(f"proxy auth: {reply(f)!r}\n")
    c.sendall(b"".join(greeting))
    threading.Thread(target=pump, args=(c, b, "C:"), daemon=True).start()
    threading.Thread(target=pump, args=(b, c, "S:"), daemon=True).start()
