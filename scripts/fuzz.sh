#!/usr/bin/env bash
# Runs the fuzz targets for SECONDS (wall clock) each, starting from their
# committed seed corpora, and prints one summary line per target with the
# CPU seconds the fuzzer used (user + system), executions and coverage.
#
#   scripts/fuzz.sh SECONDS [TARGET...]
#
# Targets: decode, open, gemini_request, join (bridges/latssiam/fuzz) and
# smtp_session, irc_line, poller_message, imap_session (fuzz/); default: all eight. Each run works on a scratch copy
# of corpus/TARGET under the fuzz crate's target/ (the committed corpus is
# never written to; CONTINUE=1 keeps the scratch corpus of the last run). Crash inputs land in the crate's artifacts/TARGET/ as
# cargo-fuzz puts them. Builds and runs are `nice -n ${NICE:-19}`; extra
# libFuzzer flags can be given in FUZZ_FLAGS (e.g. FUZZ_FLAGS=-jobs=2).
# Exit status: 0 if every target built and found nothing, 1 otherwise.
set -uo pipefail

usage() { echo "usage: $0 SECONDS [decode|open|gemini_request|join|smtp_session|irc_line|poller_message|imap_session ...]" >&2; exit 2; }
[ $# -ge 1 ] && [[ $1 =~ ^[0-9]+$ ]] || usage
secs=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
declare -A crate=(
    [decode]=bridges/latssiam/fuzz [open]=bridges/latssiam/fuzz [gemini_request]=bridges/latssiam/fuzz [join]=bridges/latssiam/fuzz
    [smtp_session]=fuzz [irc_line]=fuzz [poller_message]=fuzz [imap_session]=fuzz
)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode open gemini_request join smtp_session irc_line poller_message imap_session)
for t in "${targets[@]}"; do [ -n "${crate[$t]:-}" ] || { echo "unknown target $t" >&2; usage; }; done

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "Installing cargo-fuzz..." >&2
    nice -n "${NICE:-19}" cargo install cargo-fuzz --locked || exit 1
fi

status=0
summary=()
for t in "${targets[@]}"; do
    dir=$root/${crate[$t]}
    scratch=$dir/target/fuzz-scratch
    corpus=$scratch/corpus/$t
    log=$scratch/$t.log
    artifacts=$dir/artifacts/$t
    # CONTINUE=1 goes on from the corpus the last run left (a run in parts).
    [ "${CONTINUE:-0}" = 1 ] || rm -rf "$corpus"
    mkdir -p "$corpus" "$artifacts"
    [ -d "$dir/corpus/$t" ] && cp -an "$dir/corpus/$t/." "$corpus/"
    seeds=$(find "$corpus" -type f | wc -l)
    before=$(find "$artifacts" -type f | sort)
    echo "== $t: ${secs}s from $seeds seeds (log: ${log#"$root"/})" >&2
    # Built first, so that the CPU time measured below is the fuzzer's alone.
    (cd "$dir" && RUSTC_BOOTSTRAP=1 nice -n "${NICE:-19}" cargo fuzz build "$t") >"$log" 2>&1
    # shellcheck disable=SC2086 # FUZZ_FLAGS is a list of flags
    cpu=$( { TIMEFORMAT='%U %S'; time (cd "$dir" && RUSTC_BOOTSTRAP=1 nice -n "${NICE:-19}" cargo fuzz run "$t" "$corpus" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout="${FUZZ_TIMEOUT:-10}" ${FUZZ_FLAGS:-} >>"$log" 2>&1); } 2>&1 )
    rc=$?
    cpu=$(awk '{printf "%.0f", $1 + $2}' <<<"$cpu")
    new=$(comm -13 <(echo "$before") <(find "$artifacts" -type f | sort) | sed '/^$/d')
    crashes=$(printf '%s' "$new" | grep -c . || true)
    if ! grep -q 'stat::number_of_executed_units' "$log" && [ "$crashes" -eq 0 ]; then
        summary+=("$(printf '%-15s did not run (rc=%s): %s' "$t" "$rc" \
            "$(grep -m1 -E '^error|error\[|ERROR' "$log" || tail -n1 "$log")")")
        status=1
        continue
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n1 | grep -o '[0-9]*$')
    if [ -z "$execs" ]; then
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -n1 | tr -d '#')
    fi
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+')
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -n1 | grep -oE '[0-9]+')
    units=$(find "$corpus" -type f | wc -l)
    line=$(printf '%-15s cpu=%-6ss execs=%-9s cov=%-6s ft=%-6s corpus=%s->%s crashes=%s' \
        "$t" "${cpu:-?}" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$seeds" "$units" "$crashes")
    if [ "$crashes" -gt 0 ]; then
        line+=" ($(echo "$new" | sed "s|^$root/||" | tr '\n' ' '))"
        status=1
    fi
    summary+=("$line")
done
printf '%s\n' "${summary[@]}"
exit $status
