"""Sends one message with smtplib: smtp_send.py HOST PORT FROM RCPT[,RCPT...] FILE [--starttls] [--source ADDR].
Prints "accepted CODE TEXT" with the reply to DATA, or "refused CODE TEXT" with
the first refusal (at MAIL, RCPT or DATA). Exits 0 either way; 2 on a broken session."""
import smtplib
import sys


def main():
    host, port, sender, rcpts, path = sys.argv[1:6]
    starttls = "--starttls" in sys.argv[6:]
    source = None
    if "--source" in sys.argv[6:]:
        source = (sys.argv[sys.argv.index("--source") + 1], 0)
    with open(path, "rb") as f:
        data = f.read()
    try:
        with smtplib.SMTP(host, int(port), timeout=60, source_address=source) as s:
            s.ehlo("client.example")
            if starttls:
                import ssl
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                s.starttls(context=ctx)
                s.ehlo("client.example")
            code, msg = s.mail(sender)
            if code != 250:
                print("refused", code, msg.decode())
                return
            for r in rcpts.split(","):
                code, msg = s.rcpt(r)
                if code not in (250, 251):
                    print("refused", code, msg.decode())
                    return
            code, msg = s.data(data)
            print("accepted" if code == 250 else "refused", code, msg.decode())
    except smtplib.SMTPResponseException as e:
        print("refused", e.smtp_code, e.smtp_error.decode())
    except (OSError, smtplib.SMTPException) as e:
        print("broken", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
