"""An SMTP receiver that, like many MTAs, ends DATA at <LF>.<CR><LF> (not only
at <CR><LF>.<CR><LF>): the receiver that outbound SMTP smuggling exploits.
lenient_smtp.py PORT OUTDIR writes each transaction to OUTDIR/N.json as the
aiosmtpd smarthost does (mail_from, rcpt_tos, data), so a smuggled second
transaction shows up as a file of its own. Prints "ready"; runs until killed.
A real receiver, not a mock: it speaks SMTP over TCP to whatever connects."""
import json
import os
import socketserver
import sys
import threading
import time

lock = threading.Lock()
count = [0]


class Session(socketserver.StreamRequestHandler):
    def reply(self, line):
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self):
        outdir = self.server.outdir
        self.reply("220 lenient.test ESMTP")
        mail_from, rcpts = None, []
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            cmd = line.strip().decode("latin-1")
            verb = cmd[:4].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250-lenient.test")
                self.reply("250 8BITMIME")
            elif verb == "MAIL":
                mail_from, rcpts = cmd[10:].strip().split(" ")[0], []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpts.append(cmd[8:].strip().strip("<>"))
                self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                self.reply("354 go ahead")
                data, prev = b"", b"\n"
                while True:
                    l = self.rfile.readline(65536)
                    if not l:
                        return
                    # Lenient: "." at the start of any line that follows a LF ends the data.
                    if l in (b".\r\n", b".\n") and prev.endswith(b"\n"):
                        break
                    data += l[1:] if l.startswith(b".") else l
                    prev = l
                with lock:
                    count[0] += 1
                    n = count[0]
                record = {"mail_from": mail_from, "rcpt_tos": rcpts,
                          "data": data.decode("utf-8", "surrogateescape"), "received_at": time.time()}
                tmp = os.path.join(outdir, f".{n}.tmp")
                with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
                    json.dump(record, f)
                os.rename(tmp, os.path.join(outdir, f"{n}.json"))
                self.reply("250 2.0.0 Ok")
            elif verb == "RSET":
                mail_from, rcpts = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("250 2.0.0 Ok")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    server = Server(("127.0.0.1", port), Session)
    server.outdir = outdir
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
