#!/usr/bin/env bash
# The Debian package on a clean Debian root, under a real systemd booted as PID 1 of a new PID and
# mount namespace whose root is that clean root: install, the first client (as nobody) starts the
# daemon through socket activation, reload, an upgrade keeps the published data and the operator's
# edited config, remove keeps the config, purge leaves nothing behind (the root's file list and its
# user database are as before the install).
#
#     Tests/package/deb.sh [ROOT_CACHE]
#
# Needs root, debootstrap and a Debian mirror (DEBIAN_MIRROR, default deb.debian.org; without one
# it exits 77, skipped). The clean
# root (debootstrap --variant=minbase with systemd) is made once into ROOT_CACHE (default
# /var/tmp/shmbroker-debroot) and copied for every run, so a run never changes the cache.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "Tests/package/deb.sh needs root (it boots systemd in a namespace)" >&2; exit 2; }
cache=${1:-/var/tmp/shmbroker-debroot}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
arch=$(dpkg --print-architecture)

# Installed the way a user installs a local package, with apt (which resolves its dependencies
# from the root's mirror: the unit's ExecReload needs /bin/kill from procps, which minbase lacks).
# "installed" or "absent" (never installed, or purged: dpkg may keep a not-installed entry).
presence() { case "$(inside dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" in *" installed") echo installed ;; *) echo absent ;; esac; }
# The version number of the status segment's latest version, from `shmbrokerctl read --verbose`.
published_version() { inside shmbrokerctl read status --verbose 2>&1 >/dev/null | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -1; }
apt_in() { inside env DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0 "$@" >/dev/null; }

# Not under /tmp: the booted systemd must not see the host's /tmp, and the host's tmp cleaners must
# not see this.
work=$(mktemp -d /var/tmp/shmbroker-deb-test.XXXXXX)
sd=0
cleanup() {
    if [ "$sd" != 0 ] && kill -0 "$sd" 2>/dev/null; then
        timeout 20 nsenter -t "$sd" -m -p -r -w systemctl poweroff --no-block >/dev/null 2>&1 || true
        for _ in $(seq 100); do kill -0 "$sd" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$sd" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    # The root's mounts lived in the namespace and went with it; only files remain.
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

inside() { timeout 120 nsenter -t "$sd" -m -p -r -w "$@"; }
passed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
fail() {
    echo "FAIL: $1"
    echo "--- journal of shmbroker in the namespace:"
    inside journalctl -u shmbroker.service -u shmbroker.socket --no-pager -o short-monotonic 2>&1 | tail -40 || true
    exit 1
}
expect() { # expect DESCRIPTION EXPECTED ACTUAL
    [ "$2" = "$3" ] && ok "$1" || fail "$1: expected '$2', got '$3'"
}

echo "--- building the packages (0.2.0, and 0.2.1 for the upgrade)"
SHMBROKER_DEB_VERSION=0.2.0 systemd/build-deb.sh "$work/debs" >/dev/null
SHMBROKER_DEB_VERSION=0.2.1 systemd/build-deb.sh "$work/debs" >/dev/null
ls "$work/debs"

if [ ! -x "$cache/lib/systemd/systemd" ]; then
    echo "--- making a clean Debian root in $cache (debootstrap, once)"
    command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    rm -rf "$cache.partial"
    if ! debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$cache.partial" "$mirror" > "$work/debootstrap.log" 2>&1; then
        tail -5 "$work/debootstrap.log"
        # The mirror, not the package, failed: say so and exit 77 (skipped), as automake's tests do.
        echo "SKIP: debootstrap from $mirror failed; the package test needs a Debian mirror"
        exit 77
    fi
    mv "$cache.partial" "$cache"
fi
root="$work/root"
cp -a "$cache" "$root"
cp "$work"/debs/*.deb "$root/root/"

# The snapshot that purge must return to: every file name on the root's own file system (what
# dpkg, apt, journald and systemd keep for themselves left out), and the user database.
snapshot() {
    inside sh -c 'find / -xdev -path /var/lib/dpkg -prune -o -path /var/log -prune -o -path /var/cache -prune \
        -o -path /root -prune -o -path /var/lib/apt -prune -o -path /var/lib/systemd/random-seed -prune -o -path /var/lib/systemd/catalog -prune \
        -o -path /var/lib/systemd/timers -prune -o -path /var/lib/systemd/timesync -prune -o -path /etc/ld.so.cache -prune \
        -o -print | sort; cat /etc/passwd /etc/group /etc/shadow /etc/gshadow'
}

cat > "$work/boot.sh" <<'BOOT'
#!/bin/sh
# PID 1 of the new namespaces: make the clean root the root, then become its systemd.
set -e
root=$1
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mkdir -p "$root/.host"
cd "$root"
pivot_root . .host
umount -l /.host
rmdir /.host
exec env container=unshare /lib/systemd/systemd --system --log-target=journal
BOOT
chmod 0755 "$work/boot.sh"

echo "--- booting systemd on the clean root"
setsid unshare --fork --pid --mount --mount-proc --propagation private "$work/boot.sh" "$root" </dev/null >"$work/boot.log" 2>&1 &
unshare_pid=$!
for _ in $(seq 300); do
    child=$(cat "/proc/$unshare_pid/task/$unshare_pid/children" 2>/dev/null | cut -d' ' -f1)
    # (the boot script first, then, after its exec, systemd: /lib is /usr/lib on a merged-/usr root)
    case "$(readlink "/proc/${child:-0}/exe" 2>/dev/null)" in /usr/lib/systemd/systemd|/lib/systemd/systemd) sd=$child; break ;; esac
    kill -0 "$unshare_pid" 2>/dev/null || { cat "$work/boot.log"; echo "FAIL: the namespace exited during boot"; exit 1; }
    sleep 0.1
done
[ "$sd" != 0 ] || { cat "$work/boot.log"; echo "FAIL: systemd did not start"; exit 1; }
for _ in $(seq 300); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    [ "$state" = running ] || [ "$state" = degraded ] && break
    sleep 0.2
done
[ "$state" = running ] || [ "$state" = degraded ] || fail "systemd on the clean root never reached running (state '$state')"
ok "systemd booted on a clean debootstrapped root (state: $state)"
before=$(snapshot)

echo "--- install"
expect "procps is not on the clean root" absent "$(presence procps)"
apt_in install "/root/shmbroker_0.2.0_${arch}.deb" || fail "apt-get install ./shmbroker_0.2.0_${arch}.deb"
expect "the package is installed" "install ok installed 0.2.0" "$(inside dpkg-query -W -f='${Status} ${Version}' shmbroker)"
expect "its dependencies came with it (procps for ExecReload's kill)" installed "$(presence procps)"
inside getent passwd shmbroker >/dev/null && ok "the shmbroker user exists" || fail "no shmbroker user"
expect "shmbroker.socket is enabled" enabled "$(inside systemctl is-enabled shmbroker.socket || true)"
expect "shmbroker.socket listens" active "$(inside systemctl is-active shmbroker.socket || true)"
expect "the daemon waits for its first client" inactive "$(inside systemctl is-active shmbroker.service || true)"
expect "libnats came with it (shmbroker-mirror runs)" 0 "$(inside shmbroker-mirror --version >/dev/null 2>&1; echo $?)"
inside shmbroker-mirror --check-config --config /etc/shmbroker/mirror.json >/dev/null && ok "the example mirror config checks" \
    || fail "shmbroker-mirror --check-config /etc/shmbroker/mirror.json"
expect "the mirror's unit is installed but not enabled" disabled "$(inside systemctl is-enabled shmbroker-mirror.service || true)"

echo "--- the first client starts the daemon"
inside setpriv --reuid=65534 --regid=65534 --clear-groups shmbrokerctl list >/dev/null || fail "shmbrokerctl list as nobody"
expect "a client (nobody) started the daemon through the socket" active "$(inside systemctl is-active shmbroker.service || true)"
expect "it runs as its own user" shmbroker "$(inside stat -c %U "/proc/$(inside systemctl show -p MainPID --value shmbroker.service)")"
printf 'kept across the upgrade' | inside shmbrokerctl publish status >/dev/null || fail "publish"
expect "root published and nobody reads it" "kept across the upgrade" \
    "$(inside setpriv --reuid=65534 --regid=65534 --clear-groups shmbrokerctl read status)"
version=$(published_version)
[ -n "$version" ] || fail "no version in 'shmbrokerctl read --verbose'"

echo "--- reload with an operator's edit of the config"
inside sed -i 's|"segments": \[|"segments": [\n    { "name": "added-by-the-operator", "size": "4KiB", "readers": { "users": ["*"] } },|' /etc/shmbroker/shmbroker.json
pid=$(inside systemctl show -p MainPID --value shmbroker.service)
inside systemctl reload shmbroker.service || fail "systemctl reload"
inside shmbrokerctl list | grep -q added-by-the-operator && ok "reload added the operator's segment" || fail "the new segment is not listed after reload"
expect "reload kept the daemon (same main PID)" "$pid" "$(inside systemctl show -p MainPID --value shmbroker.service)"
expect "reload kept the published data" "kept across the upgrade" "$(inside shmbrokerctl read status)"

echo "--- upgrade to 0.2.1"
apt_in install "/root/shmbroker_0.2.1_${arch}.deb" || fail "apt-get install ./shmbroker_0.2.1_${arch}.deb (upgrade)"
expect "the upgrade is installed" "install ok installed 0.2.1" "$(inside dpkg-query -W -f='${Status} ${Version}' shmbroker)"
inside grep -q added-by-the-operator /etc/shmbroker/shmbroker.json && ok "the upgrade kept the operator's config" || fail "the edited conffile was replaced"
[ "$(inside systemctl show -p MainPID --value shmbroker.service)" != "$pid" ] && ok "the upgrade restarted the daemon" \
    || fail "the daemon was not restarted by the upgrade"
expect "the upgrade kept the published data" "kept across the upgrade" "$(inside shmbrokerctl read status)"
expect "and its version" "$version" "$(published_version)"
inside shmbrokerctl list | grep -q added-by-the-operator && ok "the restarted daemon serves the edited config" || fail "the edited config is not served"

echo "--- remove"
apt_in remove shmbroker || fail "apt-get remove shmbroker"
expect "remove stopped the daemon" inactive "$(inside systemctl is-active shmbroker.service || true)"
expect "remove stopped the socket" inactive "$(inside systemctl is-active shmbroker.socket || true)"
inside test ! -e /usr/bin/shmbrokerd && inside test ! -e /run/shmbroker/control.sock && ok "remove took the binaries and the socket" \
    || fail "binaries or the socket left after remove"
inside test -f /etc/shmbroker/shmbroker.json && ok "remove kept the config (a conffile)" || fail "remove deleted the config"

echo "--- purge"
apt_in purge --autoremove shmbroker || fail "apt-get purge --autoremove shmbroker"
expect "the package is gone" absent "$(presence shmbroker)"
expect "and the dependencies it pulled in" absent "$(presence procps)"
after=$(snapshot)
if [ "$before" = "$after" ]; then
    ok "purge left nothing behind (file list and user database as before the install)"
else
    diff <(echo "$before") <(echo "$after") | head -40 || true
    fail "purge left files or users behind"
fi
echo "deb package test: $passed checks passed"
