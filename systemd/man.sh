#!/usr/bin/env bash
# Writes the manual pages into OUTDIR/man{1,5,8}: shmbrokerd(8), shmbroker-mirror(8), shmbrokerctl(1)
# and shmbroker-sysload(1) generated from the commands' own definitions (swift-argument-parser's
# generate-manual plugin), and shmbroker.json(5) from docs/man/shmbroker.json.5.
#
#     systemd/man.sh OUTDIR        (install.sh uses it; `man -l OUTDIR/man8/shmbrokerd.8` reads one)
set -euo pipefail
[ $# = 1 ] || { echo "usage: systemd/man.sh OUTDIR" >&2; exit 2; }
out=$1
cd "$(dirname "$0")/.."
generated=$(mktemp -d)
trap 'rm -rf "$generated"' EXIT
swift package --allow-writing-to-directory "$generated" generate-manual --output-directory "$generated" >/dev/null
install -d -m 0755 "$out/man1" "$out/man5" "$out/man8"
install -m 0644 "$generated/shmbrokerctl.1" "$generated/shmbroker-sysload.1" "$out/man1/"
# A daemon's page belongs in section 8; the plugin writes every page as section 1.
sed 's/^\.Dt SHMBROKERD 1$/.Dt SHMBROKERD 8/' "$generated/shmbrokerd.1" > "$out/man8/shmbrokerd.8"
sed 's/^\.Dt SHMBROKER-MIRROR 1$/.Dt SHMBROKER-MIRROR 8/' "$generated/shmbroker-mirror.1" > "$out/man8/shmbroker-mirror.8"
chmod 0644 "$out/man8/shmbrokerd.8" "$out/man8/shmbroker-mirror.8"
install -m 0644 docs/man/shmbroker.json.5 "$out/man5/"
