"""Sends COUNT messages with smtplib, one transaction each, over as few
sessions as the server allows: smtp_burst.py HOST PORT FROM RCPT COUNT TOKEN [PAUSE_SECS].
Message N has the subject "burst N TOKEN" and the body line "burst-TOKEN-N".
Prints, flushed, one line per message: "accepted N" (250 to DATA) or
"refused N CODE TEXT" or "broken N ERROR" (the session then starts again).
Exits 0."""
import smtplib
import sys
import time


def message(sender, rcpt, n, token):
    return (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: burst {n} {token}\r\n"
        f"Message-ID: <burst-{n}-{token}@client.example>\r\n\r\nburst-{token}-{n}\r\n"
    ).encode()


def main():
    host, port, sender, rcpt, count, token = sys.argv[1:7]
    pause = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    s = None
    for n in range(1, int(count) + 1):
        try:
            if s is None:
                s = smtplib.SMTP(host, int(port), timeout=60)
                s.ehlo("client.example")
            s.sendmail(sender, [rcpt], message(sender, rcpt, n, token))
            print("accepted", n, flush=True)
        except smtplib.SMTPResponseException as e:
            print("refused", n, e.smtp_code, e.smtp_error.decode(errors="replace"), flush=True)
        except smtplib.SMTPRecipientsRefused as e:
            print("refused", n, e.recipients, flush=True)
        except (OSError, smtplib.SMTPException) as e:
            print("broken", n, e, flush=True)
            s = None
        if pause:
            time.sleep(pause)
    if s is not None:
        try:
            s.quit()
        except (OSError, smtplib.SMTPException):
            pass


if __name__ == "__main__":
    main()
