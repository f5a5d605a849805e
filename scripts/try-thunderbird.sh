#!/usr/bin/env bash
# Thunderbird against `latssiam-bridge local`, by hand, under Xvfb: a fresh
# profile whose IMAP account points at a logging proxy, which logs in to
# `local` itself and greets Thunderbird with PREAUTH (Thunderbird keeps
# passwords only in its encrypted store, which a script cannot fill; so the
# account is set to "no authentication"). Four messages are put in INBOX
# first, a fifth while Thunderbird is in IDLE. Prints what Thunderbird asked
# for, every NO/BAD, and the subjects in Thunderbird's offline copy of INBOX.
#
#   scripts/try-thunderbird.sh     (needs thunderbird and xvfb from Debian; not part of CI)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${CARGO_TARGET_DIR:-}" ] || cargo build --release --quiet --manifest-path "$root/Cargo.toml"
B=${CARGO_TARGET_DIR:-$root/target}/release/latssiam-bridge
command -v thunderbird >/dev/null && command -v xvfb-run >/dev/null ||
    { echo "apt-get install --no-install-recommends thunderbird xvfb" >&2; exit 2; }
w=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; pkill -f "profile $w/profile" 2>/dev/null; rm -rf "$w"' EXIT
cd "$w"
$B identity new --address bob@example.org --out id >/dev/null
pw=$($B local --identity id --init | awk '/^password/{print $2}')
port=$((20000 + RANDOM % 10000)); proxy=$((port + 1))
$B local --identity id --server 127.0.0.1:9 --imap 127.0.0.1:$port 2>local.log &
sleep 1
append() { # subject [attachment]
    python3 - "$port" "$pw" "$1" "${2:-}" <<'PY'
import base64, imaplib, sys
port, pw, subject, attach = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
head = f"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: {subject}\r\nDate: Sun, 06 Dec 2026 10:00:00 +0000\r\n"
if attach:
    blob = base64.encodebytes(bytes(range(256)) * 40).decode().replace("\n", "\r\n")
    m = (head + "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
         "See the file.\r\n--b\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
         "Content-Disposition: attachment; filename=\"data.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + blob + "--b--\r\n")
else:
    m = head + "\r\nHello.\r\n"
M = imaplib.IMAP4("127.0.0.1", port); M.login("bob@example.org", pw); M.append("INBOX", None, None, m.encode()); M.logout()
PY
}
for i in 0 1 2; do append "hello $i"; done
append "with attachment" yes
python3 "$root/scripts/login_proxy.py" imap "$proxy" "$port" bob@example.org "$pw" "$w/imap.log" >/dev/null &
sleep 1
. "$root/scripts/thunderbird-profile.sh"
thunderbird_profile profile "$proxy"
cat >> profile/prefs.js <<PREFS
user_pref("mail.server.server1.check_new_mail", true);
user_pref("mail.server.server1.offline_download", true);
user_pref("mail.server.server1.autosync_offline_stores", true);
PREFS
HOME=$w xvfb-run -a -s "-screen 0 1280x900x24" thunderbird --profile "$w/profile" --no-remote >tb.log 2>&1 &
sleep 45
append "arrived during idle"
sleep 15
echo "Thunderbird's commands:"
grep '^C:' imap.log | sed 's/^C: [^ ]* //' | cut -c1-70 | sort | uniq -c | sort -rn
echo "NO/BAD answers: $(grep -cE '^S: [^ ]+ (NO|BAD)|^S: \* (NO|BAD|BYE)' imap.log || true)"
echo "Subjects in Thunderbird's offline INBOX:"
grep '^Subject:' profile/ImapMail/127.0.0.1/INBOX || echo "(none)"
