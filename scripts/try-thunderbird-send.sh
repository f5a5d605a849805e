#!/usr/bin/env bash
# Thunderbird sending through `latssiam-bridge local`, by hand, under Xvfb:
# bob's bridge routes alice@example.org to a reference `server` (sealed and
# signed by bob); Thunderbird's outgoing server is a logging proxy that
# authenticates to the submission listener itself (Thunderbird keeps
# passwords only in its encrypted store, which a script cannot fill), and its
# IMAP account one that logs in the same way, so that it files its Sent copy.
# A message is composed from the command line and sent with Ctrl+Return.
# Prints what Thunderbird said over SMTP, its Sent copy, and what alice fetched.
#
#   scripts/try-thunderbird-send.sh   (needs thunderbird, xvfb, xdotool from Debian; not part of CI)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${CARGO_TARGET_DIR:-}" ] || cargo build --release --quiet --manifest-path "$root/Cargo.toml"
B=${CARGO_TARGET_DIR:-$root/target}/release/latssiam-bridge
for c in thunderbird Xvfb xdotool; do
    command -v $c >/dev/null || { echo "apt-get install --no-install-recommends thunderbird xvfb xdotool" >&2; exit 2; }
done
w=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; pkill -f "profile $w/profile" 2>/dev/null; rm -rf "$w"' EXIT
cd "$w"
base=$((20000 + RANDOM % 10000))
srv=$base imap=$((base + 1)) sub=$((base + 2)) iproxy=$((base + 3)) sproxy=$((base + 4))
cat > srv.toml <<T
listen = "127.0.0.1:$srv"
data_dir = "$w/srv"
host = "example.org"
register_password = "sesame"
T
$B server --config srv.toml > srv.log 2>&1 &
sleep 1
for who in alice bob; do
    $B identity new --address $who@example.org --out $who >/dev/null
    $B register --identity $who --server 127.0.0.1:$srv --password sesame --pins pins >/dev/null
done
cat > sendmail.toml <<T
identity = "bob"
pins = "pins"
[recipients]
"alice@example.org" = "alice/cert.pem"
[routes]
"example.org" = "127.0.0.1:$srv"
T
pw=$($B local --identity bob --init | awk '/^password/{print $2}')
$B local --identity bob --pins pins --server 127.0.0.1:$srv --imap 127.0.0.1:$imap \
    --submission 127.0.0.1:$sub --sendmail-config sendmail.toml 2>local.log &
sleep 1
python3 "$root/scripts/login_proxy.py" imap $iproxy $imap bob@example.org "$pw" "$w/imap.log" >/dev/null &
python3 "$root/scripts/login_proxy.py" smtp $sproxy $sub bob@example.org "$pw" "$w/smtp.log" >/dev/null &
sleep 1
. "$root/scripts/thunderbird-profile.sh"
thunderbird_profile profile $iproxy
cat >> profile/prefs.js <<PREFS
user_pref("mail.identity.id1.smtpServer", "smtp1");
user_pref("mail.identity.id1.fcc", true);
user_pref("mail.identity.id1.fcc_folder", "imap://bob%40example.org@127.0.0.1/Sent");
user_pref("mail.identity.id1.compose_html", false);
user_pref("mail.warn_on_send_accel_key", false);
user_pref("mail.smtpservers", "smtp1");
user_pref("mail.smtp.defaultserver", "smtp1");
user_pref("mail.smtpserver.smtp1.hostname", "127.0.0.1");
user_pref("mail.smtpserver.smtp1.port", $sproxy);
user_pref("mail.smtpserver.smtp1.authMethod", 1);
user_pref("mail.smtpserver.smtp1.try_ssl", 0);
user_pref("mail.smtpserver.smtp1.username", "bob@example.org");
PREFS
export HOME=$w DISPLAY=:$((base % 1000 + 100))
Xvfb "$DISPLAY" -screen 0 1280x900x24 -nolisten tcp >xvfb.log 2>&1 &
sleep 2
thunderbird --profile "$w/profile" --no-remote \
    -compose "to='alice@example.org',subject='sent from Thunderbird',body='Hello Alice, from Thunderbird through the bridge.'" >tb.log 2>&1 &
sleep 40
win=$(xdotool search --name "Write: sent from Thunderbird" | head -1 || true)
[ -n "$win" ] || { echo "no compose window"; tail -5 tb.log; xdotool search --name "." getwindowname %@ 2>/dev/null | sort -u | head; exit 1; }
xdotool windowfocus --sync "$win" key --clearmodifiers ctrl+Return
sleep 20
xdotool search --name "." getwindowname %@ 2>/dev/null | sort -u | sed 's/^/window: /' | head
echo "Thunderbird over SMTP:"; { grep -E '^(C|S):|proxy' smtp.log || echo "(nothing)"; } | cut -c1-100 | head -30
echo "Sent folder by IMAP APPEND: $(grep -c 'APPEND' imap.log || true) APPEND command(s)"
{ grep -E 'APPEND' imap.log || true; } | cut -c1-100 | head -4
mkdir -p got
$B fetch --identity alice --pins pins --server 127.0.0.1:$srv --deadline 5 --max 1 --out-dir got 2>&1 | tail -3
echo "alice's copy:"; cat got/*.eml 2>/dev/null | grep -E '^(Subject|From|To):|Hello Alice' || echo "(none)"
