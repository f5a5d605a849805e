#!/usr/bin/env bash
# `latssiam-bridge local` against Debian's Dovecot, side by side in one run,
# on the same 1,000 real-sized messages (text and HTML, a quarter with an
# attachment; 4 KB to 1 MB, about 60 KB on average): time to a full mbsync
# of a fresh client, `FETCH 1:* (FLAGS ENVELOPE)`, and a text SEARCH; RSS
# and CPU of each server over 10 idle seconds.
#
#   scripts/bench-local-imap.sh            (needs dovecot-imapd, isync, python3)
#
# The messages go into `local` by IMAP APPEND; Dovecot serves a copy of the
# Maildir that results (its own index built on first access, as a new
# Dovecot install would). Release build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
B=${CARGO_TARGET_DIR:-$root/target}/release/latssiam-bridge
dovecot_bin=$(command -v dovecot || echo /usr/sbin/dovecot)
[ -x "$dovecot_bin" ] || { echo "dovecot is not installed (apt-get install dovecot-imapd)" >&2; exit 2; }
command -v mbsync >/dev/null || { echo "mbsync is not installed (apt-get install isync)" >&2; exit 2; }
w=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; [ -f "$w/dovecot/run/master.pid" ] && kill "$(cat "$w/dovecot/run/master.pid")" 2>/dev/null; rm -rf "$w"' EXIT
cd "$w"
$B identity new --address me@localhost --out me >/dev/null
pw=$($B local --identity me --init | awk '/^password/{print $2}')
lport=$((20000 + RANDOM % 10000)); dport=$((lport + 1))
$B local --identity me --imap 127.0.0.1:$lport 2>local.log &
lpid=$!
sleep 1
python3 - "$lport" "$pw" <<'PY'
import imaplib, random, sys, base64
port, pw = int(sys.argv[1]), sys.argv[2]
M = imaplib.IMAP4('127.0.0.1', port); M.login('me@localhost', pw)
rnd = random.Random(7)
words = "the report figures quarter budget meeting project plan review draft notes team update".split()
for i in range(1000):
    size = int(min(1_000_000, max(4_000, rnd.lognormvariate(9.8, 1.1))))
    text = ' '.join(rnd.choice(words) for _ in range(size // 12))
    lines = '\r\n'.join(text[j:j+76] for j in range(0, len(text), 76))
    m = (f"From: Person {i % 37} <p{i % 37}@example.org>\r\nTo: me@localhost\r\nSubject: {rnd.choice(words)} {i}\r\n"
         f"Date: Sun, 06 Dec 2026 10:{i % 60:02d}:00 +0000\r\nMessage-ID: <m{i}@example.org>\r\nMIME-Version: 1.0\r\n"
         "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: multipart/alternative; boundary=\"a\"\r\n\r\n"
         f"--a\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{lines[:size // 2]}\r\n"
         f"--a\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>{lines[:size // 2]}</p>\r\n--a--\r\n")
    if i % 4 == 0:
        blob = base64.encodebytes(rnd.randbytes(size // 3)).decode().replace('\n', '\r\n')
        m += f"--b\r\nContent-Type: application/pdf; name=\"r{i}.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{blob}"
    m += "--b--\r\n"
    M.append('INBOX', None, None, m.encode())
M.logout()
PY
mkdir -p dovecot/run maildir dovecot/state home
cp -a me/local/Maildir/. maildir/
# Dovecot will not open mail as root: the copy belongs to nobody.
chown -R nobody:nogroup maildir home
chmod 755 "$w"
cat > dovecot/dovecot.conf <<CONF
base_dir = $w/dovecot/run
state_dir = $w/dovecot/state
log_path = $w/dovecot/log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:$w/maildir
passdb {
  driver = static
  args = password=$pw
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=$w/home
}
service imap-login {
  inet_listener imap {
    port = $dport
  }
  inet_listener imaps {
    port = 0
  }
}
CONF
"$dovecot_bin" -c "$w/dovecot/dovecot.conf"
sleep 1
dpid=$(cat "$w/dovecot/run/master.pid")

measure() { # name port
    local name=$1 port=$2
    cat > "mbsyncrc-$name" <<RC
IMAPAccount a
Host 127.0.0.1
Port $port
User me@localhost
Pass $pw
SSLType None
AuthMechs PLAIN LOGIN

IMAPStore far
Account a

MaildirStore near
Path $w/near-$name/
Inbox $w/near-$name/INBOX

Channel c
Far :far:
Near :near:
Patterns INBOX
Create Near
SyncState *
RC
    mkdir -p "near-$name"
    local t0 t1
    t0=$(date +%s.%N); mbsync -q -c "mbsyncrc-$name" -a; t1=$(date +%s.%N)
    local sync; sync=$(echo "$t1 - $t0" | bc)
    python3 - "$name" "$port" "$pw" "$sync" <<'PY'
import imaplib, sys, time
name, port, pw, sync = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
M = imaplib.IMAP4('127.0.0.1', port); M.login('me@localhost', pw); M.select('INBOX')
t = time.perf_counter(); typ, data = M.fetch('1:*', '(FLAGS ENVELOPE)'); fetch = time.perf_counter() - t
n = len([d for d in data if d])
t = time.perf_counter(); typ, found = M.search(None, 'TEXT', 'budget'); search = time.perf_counter() - t
print(f"{name:8} mbsync {sync:6.2f} s   FETCH 1:* (FLAGS ENVELOPE) {fetch*1000:7.1f} ms ({n} msgs)   SEARCH TEXT {search*1000:7.1f} ms ({len(found[0].split())} found)")
M.logout()
PY
}
cpu() { # pids... -> jiffies summed (user+system)
    local sum=0 p
    for p in "$@"; do [ -r /proc/$p/stat ] && sum=$((sum + $(awk '{print $14 + $15}' /proc/$p/stat))); done
    echo $sum
}
rss_kb() { # pids... -> "RSS KiB (private anonymous KiB)"; file-backed pages (the program's code) are shared
    local sum=0 anon=0 p
    for p in "$@"; do
        sum=$((sum + $(awk '/VmRSS/{print $2}' /proc/$p/status 2>/dev/null || echo 0)))
        anon=$((anon + $(awk '/RssAnon/{print $2}' /proc/$p/status 2>/dev/null || echo 0)))
    done
    echo "$sum ($anon anonymous)"
}
dovecot_pids() { pgrep -f "$w/dovecot" | tr '\n' ' '; pgrep -x imap | tr '\n' ' '; }
measure local $lport
measure dovecot $dport
hold() { # port: a client logged in with INBOX selected, for 8 s
    python3 -c "import imaplib,sys,time; M=imaplib.IMAP4('127.0.0.1',int(sys.argv[1])); M.login('me@localhost',sys.argv[2]); M.select('INBOX'); time.sleep(8)" "$1" "$pw" &
    held=$!
    sleep 3
}
hold $lport; echo "RSS with one client on INBOX: local $(rss_kb $lpid) KiB"; wait $held
hold $dport; echo "RSS with one client on INBOX: dovecot (all its processes) $(rss_kb $(dovecot_pids)) KiB"; wait $held
echo "RSS with no client: local $(rss_kb $lpid) KiB, dovecot (all its processes) $(rss_kb $(dovecot_pids)) KiB"
sleep 20   # let both settle (sled finishes its background work after a burst)
c0l=$(cpu $lpid); c0d=$(cpu $(dovecot_pids)); sleep 10; c1l=$(cpu $lpid); c1d=$(cpu $(dovecot_pids))
echo "CPU over 10 idle s: local $((c1l - c0l)) jiffies, dovecot $((c1d - c0d)) jiffies (1 jiffy = 10 ms)"
