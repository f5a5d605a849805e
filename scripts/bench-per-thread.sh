#!/usr/bin/env bash
# CPU and thread switches per message, by thread, of the gateway and the
# server while the side-by-side yardstick runs one pair (docs/PERFORMANCE.md,
# eighth session): `perf stat --per-thread` on both processes for 5 s after
# the first 1,000 deliveries, divided by the deliveries in those 5 s.
# Threads are grouped by name (tokio workers, `latssiam-log`, the flushers,
# sled's IO pool).
#
#   sudo scripts/bench-per-thread.sh          (PAIRS=relay or final, N=20000 by default)
#
# Needs perf (Debian's linux-perf) and what scripts/bench-side-by-side.sh needs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 2; }
w=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$w"' EXIT
metrics() {
    curl -s 127.0.0.1:9925/metrics 2>/dev/null |
        awk '/^latssiam_bridge_deliveries_total\{channel="latssiam",result="ok"\}/{s+=$2} END{print s+0}'
}
N=${N:-20000} ROUNDS=1 PAIRS=${PAIRS:-relay} "$root/scripts/bench-side-by-side.sh" > "$w/bench" 2>&1 &
for _ in $(seq 1200); do [ "$(metrics)" -gt 1000 ] && break; sleep 0.5; done
gw=$(pgrep -f "latssiam-bridge run --config" | head -1)
srv=$(pgrep -f "latssiam-bridge server --config" | head -1 || true)
d0=$(metrics)
perf stat -e task-clock,context-switches --per-thread -p "$gw${srv:+,$srv}" -- sleep 5 > "$w/stat" 2>&1
n=$(( $(metrics) - d0 ))
echo "deliveries in 5 s: $n"
awk -v n="$n" '
    /context-switches|task-clock/ {
        t = $1; sub(/-[0-9]+$/, "", t); if (t ~ /^sled-io/) t = "sled-io"
        if ($0 ~ /context-switches/) cs[t] += $2; else ms[t] += $2
    }
    END { for (t in ms) printf "  %-20s %7.1f us/msg  %5.2f switches/msg\n", t, ms[t] * 1000 / n, cs[t] / n }
' "$w/stat" | sort
wait %1 || true
grep -E '^pair' "$w/bench"
