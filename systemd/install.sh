#!/bin/sh
# Builds release binaries and installs shmbroker as a systemd service. Run as root from the checkout:
#
#     systemd/install.sh              # binaries in /usr/local/bin
#     PREFIX=/opt/shmbroker systemd/install.sh
#
# Installs: $PREFIX/bin/{shmbrokerd,shmbrokerctl,shmbroker-sysload}, the C library (shmbroker.h in
# $PREFIX/include, libshmbroker.so.0/.so/.a in $PREFIX/lib, shmbroker.pc in $PREFIX/lib/pkgconfig),
# /etc/systemd/system/shmbroker.{service,socket}
# and the example owner's shmbroker-sysload.{service,socket} (not enabled), /etc/sysusers.d/shmbroker.conf
# (and creates the user), /etc/shmbroker/{shmbroker,sysload}.json (each kept if it exists), the JSON
# schema and the docs under $PREFIX/share. Then: systemctl enable --now shmbroker.socket
set -eu
PREFIX=${PREFIX:-/usr/local}
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it writes to $PREFIX, /etc/systemd/system and /etc)" >&2
    exit 1
fi
if ! pkg-config --exists libsystemd 2>/dev/null; then
    apt-get update -qq && apt-get install -y libsystemd-dev pkg-config
fi

# Static Swift runtime: the service then needs nothing from the toolchain at run time.
swift build -c release --static-swift-stdlib --product shmbrokerd
swift build -c release --static-swift-stdlib --product shmbrokerctl
swift build -c release --static-swift-stdlib --product shmbroker-sysload
make -s -C Sources/libshmbroker PREFIX="$PREFIX" BUILD="$(pwd)/.build/libshmbroker"
BIN=$(swift build -c release --static-swift-stdlib --show-bin-path)

install -d -m 0755 "$PREFIX/bin" "$PREFIX/share/shmbroker" "$PREFIX/share/doc/shmbroker/examples" /etc/shmbroker /etc/sysusers.d
install -m 0755 "$BIN/shmbrokerd" "$BIN/shmbrokerctl" "$BIN/shmbroker-sysload" "$PREFIX/bin/"
for unit in shmbroker shmbroker-sysload; do
    sed "s|/usr/local/bin/|$PREFIX/bin/|; s|/usr/local/share|$PREFIX/share|" \
        "systemd/$unit.service" > "/etc/systemd/system/$unit.service"
    chmod 0644 "/etc/systemd/system/$unit.service"
    install -m 0644 "systemd/$unit.socket" "/etc/systemd/system/$unit.socket"
done
install -m 0644 systemd/shmbroker.sysusers.conf /etc/sysusers.d/shmbroker.conf
install -m 0644 config/shmbroker.schema.json "$PREFIX/share/shmbroker/"
# The C library: header, shared library with its soname link, static library, pkg-config file.
install -d -m 0755 "$PREFIX/include" "$PREFIX/lib/pkgconfig"
install -m 0644 Sources/libshmbroker/include/shmbroker.h "$PREFIX/include/"
install -m 0755 .build/libshmbroker/libshmbroker.so.0 "$PREFIX/lib/"
ln -sf libshmbroker.so.0 "$PREFIX/lib/libshmbroker.so"
install -m 0644 .build/libshmbroker/libshmbroker.a "$PREFIX/lib/"
install -m 0644 .build/libshmbroker/shmbroker.pc "$PREFIX/lib/pkgconfig/"
if command -v ldconfig >/dev/null; then ldconfig; fi
install -m 0644 README.md docs/LAYOUT.md docs/PROTOCOL.md docs/OWNER.md docs/PERFORMANCE.md "$PREFIX/share/doc/shmbroker/"
install -m 0644 docs/examples/reader.py docs/examples/reader.c "$PREFIX/share/doc/shmbroker/examples/"
if [ -e /etc/shmbroker/shmbroker.json ]; then
    echo "keeping the existing /etc/shmbroker/shmbroker.json"
else
    sed "s|/usr/local/share|$PREFIX/share|" config/shmbroker.json > /etc/shmbroker/shmbroker.json
    chmod 0644 /etc/shmbroker/shmbroker.json
fi
if [ ! -e /etc/shmbroker/sysload.json ]; then
    install -m 0644 config/sysload.json /etc/shmbroker/sysload.json
fi
"$PREFIX/bin/shmbrokerd" --check-config --config /etc/shmbroker/shmbroker.json
"$PREFIX/bin/shmbrokerd" --check-config --config /etc/shmbroker/sysload.json

if command -v systemd-sysusers >/dev/null; then systemd-sysusers /etc/sysusers.d/shmbroker.conf; fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
echo "installed; enable with: systemctl enable --now shmbroker.socket"
