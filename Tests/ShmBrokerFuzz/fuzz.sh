#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer) of the control protocol's frame decoder and of the config
# loader, seeded with every example frame in docs/PROTOCOL.md and every config in config/.
#
#     Tests/ShmBrokerFuzz/fuzz.sh [SECONDS_PER_TARGET]     # default 60 (what CI runs); longer: 3600
#
# Exits non-zero if either target crashes, traps or hangs; the input that did it is left in the
# printed directory (replay it with `shmbroker-fuzz frame|config FILE` from a normal build).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-60}

# The harness module and everything it uses, instrumented for libFuzzer (coverage and compare
# tracing); then linked with libFuzzer's own main. (SwiftPM's executables bring a main of their
# own, so the link is done here, from the objects.)
swift build --scratch-path .build-fuzz --target ShmBrokerFuzzHarness \
    -Xswiftc -sanitize=fuzzer -Xswiftc -DFUZZING -Xcc -fsanitize=fuzzer-no-link >/dev/null
objects=()
for module in ShmBrokerFuzzHarness ShmBrokerConfig ShmBrokerProtocol ShmBrokerCore ShmBrokerPlatform \
              CShmBrokerShim CShmBrokerCRC Atomics _AtomicsShims SystemPackage CSystem; do
    while IFS= read -r -d '' object; do objects+=("$object"); done < <(find ".build-fuzz/debug/$module.build" -name '*.o' -print0)
done
binary=.build-fuzz/shmbroker-fuzzer
swiftc -sanitize=fuzzer "${objects[@]}" -o "$binary" 2> >(grep -v "Cannot export local symbol" >&2)

work=$(mktemp -d /tmp/shmbroker-fuzz.XXXXXX)
mkdir -p "$work/frame" "$work/config"
cp config/*.json "$work/config/"
# Every hex example of docs/PROTOCOL.md (continuation lines start with "|") becomes a seed frame.
python3 - "$work/frame" docs/PROTOCOL.md <<'PY'
import re, sys
out, doc = sys.argv[1], open(sys.argv[2]).read()
frames, current = [], None
for block in re.findall(r"```\n(.*?)```", doc, re.S):
    for line in block.splitlines():
        pairs = re.findall(r"(?<![0-9a-zA-Z])[0-9a-f]{2}(?![0-9a-zA-Z])", line.split('"')[0])
        if not pairs:
            continue
        if line.lstrip().startswith("|") and current is not None:
            current += bytes(int(p, 16) for p in pairs)
        else:
            current = bytes(int(p, 16) for p in pairs)
            frames.append(current)
        frames[-1] = current
for index, frame in enumerate(frames):
    open(f"{out}/protocol-example-{index}", "wb").write(frame)
print(f"{len(frames)} seed frames from docs/PROTOCOL.md")
PY

status=0
for target in frame config; do
    log="$work/$target.log"
    if SHMBROKER_FUZZ_TARGET=$target "$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$work/crash-$target-" "$work/$target" >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        echo "fuzz $target: ${runs:-?} inputs in ${seconds} s, no crash"
    else
        echo "fuzz $target: FAILED; see $log and $work/crash-$target-*"
        tail -40 "$log"
        status=1
    fi
done
[ "$status" = 0 ] && rm -rf "$work"
exit "$status"
