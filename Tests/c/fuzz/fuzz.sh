#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer, with AddressSanitizer and UBSan) of libshmbroker's reply
# parsing: the owner's answers are the input (Tests/c/fuzz/fuzz_replies.c).
#
#     Tests/c/fuzz/fuzz.sh [SECONDS]     # default 60 (what CI runs)
#
# Exits non-zero on a crash, a sanitizer report or a hang; the input is left in the printed directory.
set -euo pipefail
cd "$(dirname "$0")/../../.."
seconds=${1:-60}
clang=$(command -v clang || echo /opt/swift/usr/bin/clang)
work=$(mktemp -d /tmp/shmbroker-cfuzz.XXXXXX)
"$clang" -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -ISources/libshmbroker/include -ISources/libshmbroker -ISources/CShmBrokerCRC/include \
    -o "$work/fuzz_replies" Tests/c/fuzz/fuzz_replies.c Sources/CShmBrokerCRC/crc64_clmul.c 2> >(grep -v "Cannot export local symbol" >&2)
mkdir -p "$work/corpus"
# Seeds (a byte choosing the request, then frames): a HELLO_OK, an OPENED, a SUBSCRIBED, a
# STATUS_REPORT (inline and as a file), an event then an ERROR, each as reply id 1.
python3 - "$work/corpus" <<'PY'
import struct, sys
def frame(kind, body, rid=1, memfd=False):
    raw = struct.pack("<HHII", kind, 0, rid, len(body)) + body
    return struct.pack("<H", len(raw) | (0x8000 if memfd else 0)) + raw
seeds = {
    "hello_ok": b"\x00" + frame(0x8001, struct.pack("<II", 1, 65536) + struct.pack("<H", 4) + b"fuzz"),
    "opened": b"\x00" + frame(0x8002, struct.pack("<QIIQQ", 64, 2, 2, 512, 0), memfd=True),
    "subscribed": b"\x01" + frame(0x8003, struct.pack("<QQQQ", 1, 2, 3, 4)),
    "status": b"\x03" + frame(0x8006, b'{"segments": []}'),
    "status_file": b"\x03" + frame(0x8007, struct.pack("<Q", 2**64 - 1), memfd=True),
    "event_then_error": b"\x04" + frame(0x4001, struct.pack("<H", 4) + b"fuzz" + struct.pack("<QQQQ", 1, 2, 3, 4), 0)
                        + frame(0x80FF, struct.pack("<H", 5) + struct.pack("<H", 3) + b"no!"),
}
for name, data in seeds.items():
    open(f"{sys.argv[1]}/{name}", "wb").write(data)
PY
log="$work/fuzz.log"
if "$work/fuzz_replies" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$work/crash-" "$work/corpus" >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz libshmbroker replies: ${runs:-?} inputs in ${seconds} s, no crash"
    rm -rf "$work"
else
    echo "fuzz libshmbroker replies: FAILED; see $log and $work/crash-*"
    tail -40 "$log"
    exit 1
fi
