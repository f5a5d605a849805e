"""Login proxy for trying Thunderbird against `latssiam-bridge local`
(Thunderbird keeps passwords only in its encrypted store, which a script
cannot fill): logs in to the bridge itself, then relays both ways and logs
every line.

    login_proxy.py imap LISTEN TARGET USER PASSWORD LOG
        logs in (LOGIN) and greets the client with PREAUTH
    login_proxy.py smtp LISTEN TARGET USER PASSWORD LOG
        authenticates (EHLO, AUTH PLAIN) and hands the client the greeting
"""
import base64, socket, sys, threading
protocol = sys.argv[1]
listen, target, user, password, log = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
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

def smtp_reply(f):
    lines = []
    while True:
        l = f.readline()
        lines.append(l)
        if len(l) < 4 or l[3:4] != b"-":
            return lines

def imap_login(b, f):
    f.readline()
    b.sendall(b"p0 LOGIN " + user.encode() + b" " + password.encode() + b"\r\n")
    out.write(f"proxy login: {f.readline()!r}\n")
    return b"* PREAUTH proxy logged in\r\n"

def smtp_login(b, f):
    greeting = smtp_reply(f)
    b.sendall(b"EHLO proxy\r\n")
    smtp_reply(f)
    token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    b.sendall(b"AUTH PLAIN " + token + b"\r\n")
    out.write(f"proxy auth: {smtp_reply(f)!r}\n")
    return b"".join(greeting)

login = {"imap": imap_login, "smtp": smtp_login}[protocol]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen)); srv.listen(16)
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    b = socket.create_connection(("127.0.0.1", target))
    c.sendall(login(b, b.makefile("rb")))
    threading.Thread(target=pump, args=(c, b, "C:"), daemon=True).start()
    threading.Thread(target=pump, args=(b, c, "S:"), daemon=True).start()
