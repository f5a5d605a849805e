#!/bin/bash
# Large mail, Postfix and latssiam-bridge side by side in one run, under the same independent load
# generator (Postfix's smtp-source, 8 sessions: 8 messages in flight), on the relay pair of
# ../shared/bench/side-by-side.sh:
#   Postfix:          smtp-source -> Postfix (fsync queue) -> SMTP -> smtp-sink
#   latssiam-bridge:  smtp-source -> gateway (queue; SPF/DKIM/DMARC checked against a loopback DNS)
#                     -> PROFILE section 8 fragments, each sealed + signed -> TLS SEND -> a separate
#                     `latssiam-bridge server` process (each fragment's signature checked, stored durably)
# Prints, per message size and round, MB/s of mail end to end (Postfix: queue empty; gateway: every
# message's last fragment answered 31), the ratio, the gateway's CPU per MB, and the growth of its
# peak RSS during the round (VmHWM, reset before each round through /proc/PID/clear_refs).
# Run from the project root after `cargo build --release`. Needs root (installs and configures
# Postfix on loopback if missing) and python3 with dnslib. Env: SIZES (octets, default
# "1000000 9000000"), MB_PER_ROUND (default 144: 144 messages of 1 MB, 16 of 9 MB), ROUNDS (default 2).
set -u
SIZES=${SIZES:-1000000 9000000}; MB_PER_ROUND=${MB_PER_ROUND:-144}; ROUNDS=${ROUNDS:-2}
B=$PWD/target/release/latssiam-bridge
[ -x "$B" ] || { echo "run from the project root after cargo build --release"; exit 2; }
if ! command -v smtp-source >/dev/null; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
[ -f /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
postconf -e 'inet_interfaces = loopback-only' 'mydestination =' 'relay_domains = relay.test' \
  'relayhost = [127.0.0.1]:2526' 'mynetworks = 127.0.0.0/8' 'default_process_limit = 100' \
  'myhostname = bench.localdomain' 'maillog_file = /var/log/postfix.log' 'message_size_limit = 10240000'
w=$(mktemp -d); sink=; gw=; srv=; dns=
trap 'kill $sink $gw $srv $dns 2>/dev/null; postfix stop >/dev/null 2>&1; rm -rf "$w"' EXIT
now() { date +%s.%N; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
kib() { awk -v k="$2:" '$1==k{print $2}' "/proc/$1/status"; }
smtp-sink -u root 127.0.0.1:2526 1000 & sink=$!
postfix start >/dev/null 2>&1 || postfix reload >/dev/null 2>&1
: > "$w/zone"
python3 tests/support/dns_server.py --zone "$w/zone" --port 0 > "$w/dns.out" & dns=$!
for i in $(seq 50); do grep -q ready "$w/dns.out" && break; sleep 0.1; done
dnsport=$(awk '{print $2}' "$w/dns.out")
cat > "$w/srv.toml" <<EOT
listen = "127.0.0.1:1978"
data_dir = "$w/srv"
host = "remote.test"
register_password = "sesame"
max_unread_per_sender = 100000000
max_unread_per_mailbox = 100000000
send_rate_per_second = 1000000.0
send_burst = 1000000.0
EOT
"$B" server --config "$w/srv.toml" > "$w/srv.log" 2>&1 & srv=$!
cat > "$w/gw.toml" <<EOT
[gateway]
data_dir = "$w/gw"
domains = ["example.org", "relay.test"]
# The bench is one origin sending far more than a day's share to one person.
max_per_origin_per_day = 0
[home]
host = "example.org"
register_password = "sesame"
[smtp]
listen = "127.0.0.1:2525"
[http]
listen = "127.0.0.1:9925"
[dns]
nameservers = ["127.0.0.1:$dnsport"]
[routes]
"remote.test" = "127.0.0.1:1978"
[queue]
concurrency = ${CONCURRENCY:-64}
destination_concurrency = ${CONCURRENCY:-20}
EOT
"$B" run --config "$w/gw.toml" > "$w/gw.log" 2>&1 & gw=$!
for i in $(seq 100); do curl -sf 127.0.0.1:9925/healthz >/dev/null && break; sleep 0.2; done
"$B" identity new --address "ruser@remote.test" --out "$w/ruser" >/dev/null
"$B" register --identity "$w/ruser" --server 127.0.0.1:1978 --password sesame --pins "$w/pins" >/dev/null \
  || { echo "register (remote) failed"; cat "$w/srv.log"; exit 1; }
"$B" contacts add --config "$w/gw.toml" --cert "$w/ruser/cert.pem" --email user@relay.test >/dev/null \
  || { echo "contacts add failed"; exit 1; }
delivered() { curl -s 127.0.0.1:9925/metrics | awk '/^latssiam_bridge_deliveries_total\{channel="latssiam",result="ok"\}/{s+=$2} END{print s+0}'; }
postfix_empty() { [ "$(find /var/spool/postfix/{incoming,active,deferred,maildrop} -type f 2>/dev/null | wc -l)" = 0 ]; }
for r in $(seq "$ROUNDS"); do
  for size in $SIZES; do
    n=$(( MB_PER_ROUND * 1000000 / size )); mb=$(python3 -c "print($n*$size/1e6)")
    s=$(now); smtp-source -s 8 -m "$n" -l "$size" -f sender@client.test -t user@relay.test 127.0.0.1:25; a=$(now)
    for i in $(seq 6000); do postfix_empty && break; sleep 0.05; done
    d=$(now); pe=$(python3 -c "print($mb/($d-$s))")
    base=$(delivered); t0=$(ticks $gw); u0=$(ticks $srv)
    echo 5 > "/proc/$gw/clear_refs"; rss0=$(kib $gw VmRSS)
    s=$(now); smtp-source -s 8 -m "$n" -l "$size" -f sender@client.test -t user@relay.test 127.0.0.1:2525; a=$(now)
    for i in $(seq 12000); do [ "$(( $(delivered) - base ))" -ge "$n" ] && break; sleep 0.05; done
    d=$(now); ge=$(python3 -c "print($mb/($d-$s))")
    hwm=$(kib $gw VmHWM)
    cpu=$(python3 -c "print(($(ticks $gw)-$t0)/$(getconf CLK_TCK)/$mb*1000)")
    scpu=$(python3 -c "print(($(ticks $srv)-$u0)/$(getconf CLK_TCK)/$mb*1000)")
    python3 -c "print('size $size round $r (%d msgs, %.0f MB): postfix e2e %.1f MB/s | latssiam-bridge e2e %.1f MB/s | ratio %.2f | gateway CPU %.0f ms/MB, server %.0f ms/MB | gateway peak RSS growth %.1f MB (from %.1f MB)' % ($n,$mb,$pe,$ge,$ge/$pe,$cpu,$scpu,($hwm-$rss0)/1024,$rss0/1024))"
  done
done
grep -c 'refused\|WARN' "$w/gw.log" | sed 's/^/gateway log warnings: /'
