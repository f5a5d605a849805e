"""A smarthost for the gateway's tests: aiosmtpd on 127.0.0.1:PORT, writing
each message it receives to OUTDIR/N.json (envelope sender, recipients, data).
Recipients whose local part starts with "reject" get 550 5.1.1.
Prints "ready" once listening; runs until killed."""
import asyncio
import json
import os
import sys
import time

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, outdir):
        self.outdir = outdir
        self.n = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.split("@")[0].startswith("reject"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "data": envelope.original_content.decode("utf-8", "surrogateescape"),
            "received_at": time.time(),
        }
        tmp = os.path.join(self.outdir, f".{self.n}.tmp")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(self.outdir, f"{self.n}.json"))
        return "250 2.0.0 Ok"


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    controller = Controller(Handler(outdir), hostname="127.0.0.1", port=port,
                            decode_data=False, enable_SMTPUTF8=True, data_size_limit=0)
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
