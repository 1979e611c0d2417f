#!/usr/bin/env bash
# Model-checks the segment protocol (Tests/model/segment.pml) with spin: the real protocol with 2
# and 3 slots must hold every property; the known-bad variant (the waker clears the "asleep"
# mark) must be caught. Prints one line per check and a closing count.
set -euo pipefail
cd "$(dirname "$0")"
command -v spin >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq spin >/dev/null; }
work=$(mktemp -d /tmp/shmbroker-model.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp segment.pml "$work/"
cd "$work"
passed=0 failed=0
verify() {  # verify NAME EXPECT(hold|violated) DEFINES...
    local name=$1 expect=$2; shift 2
    rm -f pan pan.* segment.pml.trail
    spin -a "$@" segment.pml >/dev/null
    gcc -O2 -DSAFETY -DVECTORSZ=4096 -o pan pan.c 2>/dev/null
    local output
    output=$(./pan -m100000 2>&1 || true)
    local errors states
    errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' <<<"$output" | head -1)
    states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' <<<"$output" | head -1)
    if { [ "$expect" = hold ] && [ "$errors" = 0 ]; } || { [ "$expect" = violated ] && [ "${errors:-0}" != 0 ]; }; then
        echo "model $name: ${errors:-?} errors in ${states:-?} states (expected: $expect) ok"
        passed=$((passed + 1))
    else
        echo "model $name: ${errors:-?} errors (expected: $expect) FAILED"; echo "$output" | tail -20
        [ -f segment.pml.trail ] && spin -t -p "$@" segment.pml | tail -40
        failed=$((failed + 1))
    fi
}
verify "2 slots" hold -DSLOTS=2
verify "3 slots" hold -DSLOTS=3
verify "the waker clears the mark (known bad)" violated -DSLOTS=2 -DWAKER_CLEARS
verify "no re-check after the copy (known bad)" violated -DSLOTS=2 -DNO_RECHECK
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
