#!/bin/sh
# Applies POSTFIX_POSTCONF (one "name = value" per line, for postconf -e),
# creates whatever the queue volume lacks, then runs the command
# (postfix start-fg: the master in the foreground, logging to stdout).
set -eu
if [ -n "${POSTFIX_POSTCONF:-}" ]; then
    printf '%s\n' "$POSTFIX_POSTCONF" | while IFS= read -r line; do
        [ -n "$line" ] && postconf -e "$line"
    done
fi
postfix check
exec "$@"
