"""Authoritative DNS on loopback for the SPF/DKIM/DMARC/MX tests, UDP and TCP:
dns_server.py --zone FILE [--zone FILE ...] --port PORT [--address 127.0.0.1]
BIND-style zones via dnslib's RR.fromZone (pip install dnslib==0.9.26). A held
name (or an empty non-terminal above one) lacking the asked type: NOERROR, no
answer (NODATA); any other name: NXDOMAIN, never REFUSED; negative answers carry
the zone's SOA if any. Case-insensitive; in-zone CNAMEs followed. Prints "ready
PORT" once both sockets are bound (PORT 0: a free one); exits 0 on SIGTERM."""
import argparse, signal, socket, socketserver, struct, sys, threading
from dnslib import QTYPE, RCODE, RR, DNSRecord

RECORDS = {}  # lowercased owner name, trailing dot -> [RR]

def add_answers(reply, name, qtype, depth=0):
    rrs = RECORDS.get(name, [])
    hits = [rr for rr in rrs if qtype in (rr.rtype, QTYPE.ANY)]
    cnames = [rr for rr in rrs if rr.rtype == QTYPE.CNAME]
    if not hits and cnames and depth < 8:
        reply.add_answer(cnames[0])
        add_answers(reply, str(cnames[0].rdata.label).lower(), qtype, depth + 1)
    reply.add_answer(*hits)

def respond(data, udp):
    try:
        request = DNSRecord.parse(data)
    except Exception:  # not DNS: say nothing
        return None
    reply = request.reply()  # aa=1; copies id, rd and the question as asked
    name = str(request.q.qname).lower()
    add_answers(reply, name, request.q.qtype)
    if not reply.rr:
        if not any(k == name or k.endswith("." + name) for k in RECORDS):
            reply.header.rcode = RCODE.NXDOMAIN
        soas = [rr for k, rrs in RECORDS.items() if name == k or name.endswith("." + k)
                for rr in rrs if rr.rtype == QTYPE.SOA]
        if soas:
            reply.add_auth(max(soas, key=lambda rr: len(str(rr.rname))))
    limit = max([512] + [rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT])
    if udp and len(reply.pack()) > limit:  # TC=1, question kept (resolvers check it), retry on TCP
        reply = request.reply()
        reply.header.tc = 1
    return reply.pack()

class UDP(socketserver.ThreadingUDPServer):
    daemon_threads = True  # no SO_REUSEADDR: on Linux it lets two UDP sockets share a port

class TCP(socketserver.ThreadingTCPServer):
    daemon_threads = allow_reuse_address = True

class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        if isinstance(self.request, tuple):  # UDP: (datagram, socket)
            out = respond(self.request[0], True)
            if out:
                self.request[1].sendto(out, self.client_address)
            return
        f = self.request.makefile("rb")  # TCP: length-prefixed messages until EOF
        while len(head := f.read(2)) == 2:
            out = respond(f.read(struct.unpack("!H", head)[0]), False)
            if not out:
                return
            self.request.sendall(struct.pack("!H", len(out)) + out)

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--zone", action="append", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--address", default="127.0.0.1")
    args = p.parse_args()
    for path in args.zone:
        with open(path) as f:
            for rr in RR.fromZone(f.read()):
                RECORDS.setdefault(str(rr.rname).lower(), []).append(rr)
    UDP.address_family = TCP.address_family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    for attempt in range(50):  # with --port 0, find a number free for both UDP and TCP
        udp = UDP((args.address, args.port), Handler)
        try:
            tcp = TCP((args.address, udp.server_address[1]), Handler)
            break
        except OSError:
            udp.server_close()
            if args.port or attempt == 49:
                raise
    for server in (udp, tcp):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    print(f"ready {udp.server_address[1]}", flush=True)
    while True:
        signal.pause()

if __name__ == "__main__":
    main()
