#!/usr/bin/env bash
# Builds libshmbroker with AddressSanitizer and UndefinedBehaviorSanitizer and runs its C tests
# against the real daemon (.build/debug/shmbrokerd, or $SHMBROKER_BIN/shmbrokerd), as root and,
# where possible, as another uid.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=$(mktemp -d /tmp/shmbroker-c-build.XXXXXX)
work=$(mktemp -d /tmp/shmbroker-c.XXXXXX)
chmod 755 "$build" "$work"
daemon_pid=
cleanup() { [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$build" "$work"; }
trap cleanup EXIT

make -s -C Sources/libshmbroker BUILD="$build" SANITIZE=1
cc -std=c11 -Wall -Wextra -Werror -g -fsanitize=address,undefined -fno-sanitize-recover=undefined \
   -ISources/libshmbroker/include -o "$build/test_shmbroker" Tests/c/test_shmbroker.c \
   -L"$build" -lshmbroker -Wl,-rpath,"$build" -lpthread

socket="$work/control.sock"
cat > "$work/config.json" <<JSON
{"socket": {"path": "$socket", "mode": "0666"},
 "segments": [
   {"name": "small", "size": 4096, "readers": {"users": ["*"]}, "publishers": {"users": [0]}},
   {"name": "big", "size": "1MiB", "readers": {"users": [0]}},
   {"name": "private", "size": 64, "readers": {"users": [0]}}]}
JSON
"${SHMBROKER_BIN:-.build/debug}/shmbrokerd" --config "$work/config.json" --log-level warning &
daemon_pid=$!
for _ in $(seq 1 300); do [ -S "$socket" ] && break; sleep 0.05; done

"$build/test_shmbroker" root "$socket"
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
    setpriv --reuid=65534 --regid=65534 --clear-groups "$build/test_shmbroker" other "$socket"
else
    echo "libshmbroker (other): skipped (needs root and setpriv to run as another uid)"
fi

# `make install` into a scratch prefix: a program builds against it with pkg-config alone.
make -s -C Sources/libshmbroker install PREFIX="$work/prefix" BUILD="$build/installed"
cat > "$work/crc.c" <<'C'
#include <shmbroker.h>
#include <stdio.h>
int main(void) { return shmb_crc64("123456789", 9) == 0x995DC9BBDF1939FAull ? 0 : 1; }
C
cc -o "$work/crc" "$work/crc.c" $(PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig" pkg-config --cflags --libs shmbroker) \
   -Wl,-rpath,"$work/prefix/lib"
"$work/crc" && echo "libshmbroker: make install and pkg-config: 1 passed, 0 failed"

# Against a hostile owner (Tests/hostile/server.py): every scenario must end in an error, not in a
# crash or a sanitizer report.
for scenario in short-file short-sealed huge-capacity unsealed short-board pipe bad-blocks corrupt-block status-overflow status-long silent; do
    hostile="$work/hostile-$scenario.sock"
    python3 Tests/hostile/server.py "$hostile" "$scenario" >/dev/null &
    hostile_pid=$!
    for _ in $(seq 1 200); do [ -S "$hostile" ] && break; sleep 0.05; done
    status=0
    "$build/test_shmbroker" hostile "$hostile" "$scenario" || status=$?
    kill "$hostile_pid" 2>/dev/null; wait "$hostile_pid" 2>/dev/null || true
    [ "$status" = 0 ] || { echo "libshmbroker against a hostile owner ($scenario): exit status $status"; exit 1; }
done
