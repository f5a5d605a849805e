#!/usr/bin/env bash
# The team's yardstick, `../shared/bench/side-by-side.sh` (Postfix and the
# gateway under smtp-source, final and relay pairs), run as docs/PERFORMANCE.md
# measures it:
# - with a loopback DNS for the sender's domain (inbound mail is
#   authenticated; these machines resolve nothing);
# - with `gateway.max_per_origin_per_day` off. The bench's thousands of
#   messages all come from one origin to one person, and the 101st would get
#   `452 4.2.2`.
#
#   sudo scripts/bench-side-by-side.sh            (N, ROUNDS, PAIRS as the shared script takes them)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bench=$root/../shared/bench/side-by-side.sh
[ -f "$bench" ] || { echo "no $bench" >&2; exit 2; }
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
w=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$w"' EXIT
printf 'client.test. 3600 IN SOA ns.client.test. hostmaster.client.test. 1 3600 600 86400 3600\n' > "$w/zone"
python3 "$root/tests/support/dns_server.py" --zone "$w/zone" --port 0 > "$w/dns.out" &
for _ in $(seq 50); do grep -q '^ready' "$w/dns.out" 2>/dev/null && break; sleep 0.1; done
port=$(awk '/^ready/{print $2}' "$w/dns.out")
[ -n "$port" ] || { echo "the loopback DNS did not start" >&2; exit 1; }
cd "$root"
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    # The shared script runs ./target/release/latssiam-bridge.
    mkdir -p "$w/root/target"
    ln -s "$CARGO_TARGET_DIR/release" "$w/root/target/release"
    cd "$w/root"
fi
LATSSIAM_BRIDGE__DNS__NAMESERVERS=127.0.0.1:$port LATSSIAM_BRIDGE__GATEWAY__MAX_PER_ORIGIN_PER_DAY=0 bash "$bench"
