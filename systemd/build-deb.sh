#!/usr/bin/env bash
# Builds release binaries and writes OUTDIR/shmbroker_VERSION_ARCH.deb with dpkg-deb:
#
#     systemd/build-deb.sh OUTDIR
#
# SHMBROKER_DEB_VERSION overrides the package version (the upgrade test builds a second one).
#
# The package holds the binaries (Swift runtime linked statically), the units, the sysusers and
# tmpfiles snippets, the config (a conffile), the schema, man pages, shell completions, the docs,
# and libshmbroker with its header and pkg-config file. Its maintainer scripts create the user and
# enable and start shmbroker.socket the Debian way (deb-systemd-helper, deb-systemd-invoke).
set -euo pipefail
[ $# = 1 ] || { echo "usage: systemd/build-deb.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
version=${SHMBROKER_DEB_VERSION:-$(sed -n 's/.*static let string = "\(.*\)".*/\1/p' Sources/ShmBrokerProtocol/Version.swift)}
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)

command -v patchelf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq patchelf >/dev/null; }
# shmbroker-mirror links the NATS C client (the package then depends on libnats3.4).
pkg-config --exists libnats 2>/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnats-dev >/dev/null; }
for product in shmbrokerd shmbrokerctl shmbroker-sysload shmbroker-mirror; do
    swift build -c release --static-swift-stdlib --scratch-path .build-static --product "$product" >/dev/null
done
bin=$(swift build -c release --static-swift-stdlib --scratch-path .build-static --show-bin-path)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/shmbroker"
make -s -C Sources/libshmbroker PREFIX=/usr BUILD="$work/lib"

install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/lib/sysusers.d" \
    "$root/usr/lib/tmpfiles.d" "$root/etc/shmbroker" "$root/usr/share/shmbroker" "$root/usr/share/doc/shmbroker/examples" \
    "$root/usr/include" "$root/usr/lib/$multiarch/pkgconfig" "$root/usr/share/bash-completion/completions" \
    "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
for product in shmbrokerd shmbrokerctl shmbroker-sysload shmbroker-mirror; do
    install -m 0755 "$bin/$product" "$root/usr/bin/"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/$product"
    # The Swift runtime is linked in: the toolchain's library path must not stay in the binary.
    patchelf --remove-rpath "$root/usr/bin/$product"
done
for unit in shmbroker shmbroker-sysload; do
    sed -e 's|/usr/local/bin/|/usr/bin/|' -e 's|file:///usr/local/share/doc/shmbroker/README.md|man:shmbrokerd(8)|' \
        "systemd/$unit.service" > "$root/lib/systemd/system/$unit.service"
    install -m 0644 "systemd/$unit.socket" "$root/lib/systemd/system/"
    chmod 0644 "$root/lib/systemd/system/$unit.service"
done
sed -e 's|/usr/local/bin/|/usr/bin/|' -e 's|file:///usr/local/share/doc/shmbroker/MIRROR.md|man:shmbroker-mirror(8)|' \
    systemd/shmbroker-mirror.service > "$root/lib/systemd/system/shmbroker-mirror.service"
chmod 0644 "$root/lib/systemd/system/shmbroker-mirror.service"
install -m 0644 systemd/shmbroker.sysusers.conf "$root/usr/lib/sysusers.d/shmbroker.conf"
printf 'd /var/lib/shmbroker 0700 shmbroker shmbroker -\n' > "$root/usr/lib/tmpfiles.d/shmbroker.conf"
sed 's|/usr/local/share|/usr/share|' config/shmbroker.json > "$root/etc/shmbroker/shmbroker.json"
install -m 0644 config/sysload.json "$root/etc/shmbroker/sysload.json"
sed 's|/usr/local/share|/usr/share|' config/mirror.json > "$root/etc/shmbroker/mirror.json"
chmod 0644 "$root/etc/shmbroker/mirror.json"
chmod 0644 "$root/etc/shmbroker/shmbroker.json"
install -m 0644 config/shmbroker.schema.json config/shmbroker-mirror.schema.json "$root/usr/share/shmbroker/"

# Man pages (compressed, as Debian installs them) and completions.
systemd/man.sh "$work/man" 2>/dev/null
for page in "$work"/man/man*/*; do
    section=$(basename "$(dirname "$page")")
    install -d -m 0755 "$root/usr/share/man/$section"
    gzip -9n < "$page" > "$root/usr/share/man/$section/$(basename "$page").gz"
    chmod 0644 "$root/usr/share/man/$section/$(basename "$page").gz"
done
for command in shmbrokerd shmbrokerctl shmbroker-mirror; do
    # (bash completions are sourced, not run: no #! line)
    "$root/usr/bin/$command" --generate-completion-script bash | sed '1{/^#!/d}' > "$root/usr/share/bash-completion/completions/$command"
    "$root/usr/bin/$command" --generate-completion-script zsh > "$root/usr/share/zsh/vendor-completions/_$command"
    "$root/usr/bin/$command" --generate-completion-script fish > "$root/usr/share/fish/vendor_completions.d/$command.fish"
done
chmod 0644 "$root"/usr/share/*/*completion*/* "$root"/usr/share/fish/vendor_completions.d/* 2>/dev/null || true

# The C library.
install -m 0644 Sources/libshmbroker/include/shmbroker.h "$root/usr/include/"
install -m 0644 "$work/lib/libshmbroker.so.0" "$root/usr/lib/$multiarch/"
strip --strip-unneeded "$root/usr/lib/$multiarch/libshmbroker.so.0"
ln -s libshmbroker.so.0 "$root/usr/lib/$multiarch/libshmbroker.so"
install -m 0644 "$work/lib/libshmbroker.a" "$root/usr/lib/$multiarch/"
sed "s|libdir=\${prefix}/lib|libdir=\${prefix}/lib/$multiarch|" "$work/lib/shmbroker.pc" > "$root/usr/lib/$multiarch/pkgconfig/shmbroker.pc"

# Docs.
install -m 0644 README.md docs/*.md "$root/usr/share/doc/shmbroker/"
install -m 0644 docs/examples/reader.c docs/examples/reader.py "$root/usr/share/doc/shmbroker/examples/"
cat > "$root/usr/share/doc/shmbroker/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: shmbroker

Files: *
Copyright: 2026 the shmbroker authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
printf 'shmbroker (%s) unstable; urgency=medium\n\n  * Built by systemd/build-deb.sh.\n\n -- shmbroker maintainers <maintainers@shmbroker.example.org>  %s\n' \
    "$version" "$(date -R)" | gzip -9n > "$root/usr/share/doc/shmbroker/changelog.gz"

# Control files and maintainer scripts.
echo /etc/shmbroker/shmbroker.json > "$root/DEBIAN/conffiles"
echo /etc/shmbroker/sysload.json >> "$root/DEBIAN/conffiles"
echo /etc/shmbroker/mirror.json >> "$root/DEBIAN/conffiles"
# ldconfig runs from dpkg's trigger; dependents of libshmbroker.so.0 depend on this package.
echo "activate-noawait ldconfig" > "$root/DEBIAN/triggers"
echo "libshmbroker 0 shmbroker (>= $version)" > "$root/DEBIAN/shlibs"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: shmbroker
Version: $version
Architecture: $arch
Maintainer: shmbroker maintainers <maintainers@shmbroker.example.org>
Installed-Size: $size
Depends: libc6 (>= 2.34), libsystemd0, libnats3.4, libstdc++6, libgcc-s1, init-system-helpers (>= 1.54), systemd, procps
Section: admin
Priority: optional
Description: shared-memory segments for local processes, with one writer each
 shmbrokerd owns named shared-memory segments (memfds) and is their only writer:
 every version carries a CRC-64 and a version counter, written lock-free, so
 readers map a segment read-only and never see torn data. Readers use a Unix
 socket to open segments, subscribe and ask for status; producers publish
 through requests or publish rings. Includes shmbrokerctl, the example owner
 shmbroker-sysload, shmbroker-mirror (segments across hosts through a NATS
 JetStream cluster; its unit is installed but not enabled), and libshmbroker
 (C) with its header.
CONTROL
cat > "$root/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    systemd-sysusers /usr/lib/sysusers.d/shmbroker.conf || true
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/shmbroker.conf || true
fi
if [ "$1" = configure ] || [ "$1" = abort-upgrade ] || [ "$1" = abort-deconfigure ] || [ "$1" = abort-remove ]; then
    deb-systemd-helper unmask shmbroker.socket >/dev/null || true
    if deb-systemd-helper --quiet was-enabled shmbroker.socket; then
        deb-systemd-helper enable shmbroker.socket >/dev/null || true
    else
        deb-systemd-helper update-state shmbroker.socket >/dev/null || true
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        if [ -n "$2" ]; then
            # An upgrade: restart the daemon; its segments come back from the fd store.
            deb-systemd-invoke try-restart shmbroker.service >/dev/null || true
        fi
        deb-systemd-invoke start shmbroker.socket >/dev/null || true
    fi
fi
SCRIPT
cat > "$root/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    deb-systemd-invoke stop shmbroker-mirror.service shmbroker.service shmbroker.socket shmbroker-sysload.service shmbroker-sysload.socket >/dev/null || true
fi
SCRIPT
cat > "$root/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = purge ]; then
    if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper purge shmbroker.socket shmbroker.service shmbroker-sysload.socket shmbroker-sysload.service shmbroker-mirror.service >/dev/null || true
    fi
    rm -rf /var/lib/shmbroker /var/lib/shmbroker-sysload
    # The package created the user and group (sysusers); after a purge no file is theirs any more.
    # (userdel refuses while a process still runs as the user.)
    if getent passwd shmbroker >/dev/null; then userdel shmbroker >/dev/null 2>&1 || true; fi
    if getent group shmbroker >/dev/null; then groupdel shmbroker >/dev/null 2>&1 || true; fi
fi
SCRIPT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/triggers" "$root/DEBIAN/shlibs"
package="$out/shmbroker_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$package" >/dev/null
echo "$package"
