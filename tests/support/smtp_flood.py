"""Sends N numbered messages over SESSIONS parallel smtplib sessions:
smtp_flood.py HOST PORT FROM RCPT N SESSIONS [--from START] (numbers START..N,
default 0..N). Prints "ok I QUEUEID" as each is
acknowledged with 250, flushing at once; stops a session at its first error."""
import smtplib
import sys
import threading

lock = threading.Lock()


def session(host, port, sender, rcpt, numbers):
    try:
        with smtplib.SMTP(host, port, timeout=30) as s:
            for i in numbers:
                body = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: flood {i}\r\n"
                        f"Message-ID: <flood-{i}@client.example>\r\n\r\nmessage number {i}\r\n")
                s.sendmail(sender, [rcpt], body.encode())
                with lock:
                    print("ok", i, flush=True)
    except Exception as e:  # the gateway is being killed: stop quietly
        with lock:
            print("stopped", repr(e), flush=True)


def main():
    host, port, sender, rcpt, n, sessions = sys.argv[1:7]
    n, sessions = int(n), int(sessions)
    start = int(sys.argv[8]) if len(sys.argv) > 8 and sys.argv[7] == "--from" else 0
    threads = []
    for k in range(sessions):
        t = threading.Thread(target=session, args=(host, int(port), sender, rcpt, range(start + k, n, sessions)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
