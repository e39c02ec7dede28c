#!/usr/bin/env bash
# Install everything imgvault needs on a fresh Debian 12 machine (run as root).
# Usage: scripts/install-deps.sh [--peers]
#   --peers  also the peer tools of benches/peers.sh (casync, borg, restic, pyfuse3 for
#            `borg mount`, GNU time); not installed by default (CI does not need them)
# Idempotent: installs only what is missing, runs `apt-get update` only when a package
# cannot be found in the current lists. Never downgrades or removes packages (the
# preinstalled qemu-utils 10.x from bookworm-backports must survive).
set -euo pipefail

PEERS=0
case ${1:-} in
    -h|--help) echo "usage: $0 [--peers]   (as root; installs missing build/test packages;"
               echo "       --peers: also casync, borg, restic for benches/peers.sh)"; exit 0 ;;
    --peers) PEERS=1 ;;
    "") ;;
    *) echo "usage: $0 [--peers]" >&2; exit 2 ;;
esac

export DEBIAN_FRONTEND=noninteractive
# Wait for a concurrent apt/dpkg instead of failing at once.
APT_OPTS=(-y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)

# build-essential/pkg-config: C++ build of bundled RocksDB; libclang-dev/clang: its bindgen;
# fuse3: fusermount3; e2fsprogs/fdisk: test disk images (mkfs.ext4, debugfs, sfdisk);
# util-linux: losetup; fio/b3sum/zstd: benches and cross-checks; busybox-static, syslinux,
# syslinux-common, mtools, dosfstools, cpio: the bootable disk of tests/boot.rs (qemu-system-x86
# is installed below, matched to qemu-utils).
PKGS=(build-essential pkg-config libclang-dev clang fuse3 e2fsprogs fdisk util-linux
      fio b3sum zstd coreutils busybox-static syslinux syslinux-common mtools dosfstools cpio)
if [ "$PEERS" -eq 1 ]; then
    PKGS+=(casync borgbackup restic python3-pyfuse3 time)
fi
# qemu-utils: only when qemu-img is absent, so a newer backports build is left alone.
if ! command -v qemu-img >/dev/null 2>&1; then
    PKGS+=(qemu-utils)
fi

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

missing=()
for p in "${PKGS[@]}"; do
    installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps: all packages already installed"
else
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: must run as root to install: ${missing[*]}" >&2
        exit 1
    fi
    # Empty or stale lists: a package has no install candidate -> refresh once.
    need_update=0
    for p in "${missing[@]}"; do
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then need_update=1; break; fi
    done
    if [ "$need_update" -eq 1 ]; then
        echo "install-deps: apt-get update (package lists lack: ${missing[*]})"
        apt-get "${APT_OPTS[@]}" update
    fi
    echo "install-deps: installing: ${missing[*]}"
    # --no-remove: abort rather than remove anything (e.g. a backports qemu-utils).
    if ! apt-get "${APT_OPTS[@]}" --no-remove --no-install-recommends install "${missing[@]}"; then
        # Lists may be out of date (404 on a superseded version): refresh and retry once.
        echo "install-deps: install failed, retrying after apt-get update"
        apt-get "${APT_OPTS[@]}" update
        apt-get "${APT_OPTS[@]}" --no-remove --no-install-recommends install "${missing[@]}"
    fi
fi

# qemu-system-x86 (tests/boot.rs boots VMs from the mount) must come from the same release as
# qemu-utils: bookworm's 7.2 would remove the backports qemu-utils 10.x these machines carry.
# So when qemu-utils is a backports build, take qemu-system-x86 of exactly that version from
# bookworm-backports, through a private source list (the machine's own lists stay as they are).
install_qemu_system() {
    local v d rc=0
    v=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [ -z "$v" ] || [ "${v#*bpo}" = "$v" ]; then
        echo "install-deps: installing qemu-system-x86 (bookworm)"
        apt-get "${APT_OPTS[@]}" --no-remove --no-install-recommends install qemu-system-x86
        return
    fi
    echo "install-deps: installing qemu-system-x86 $v from bookworm-backports (as qemu-utils)"
    d=$(mktemp -d)
    mkdir -p "$d/lists/partial" "$d/archives/partial"
    printf 'deb http://deb.debian.org/debian %s main\n' bookworm bookworm-updates bookworm-backports \
        >"$d/sources.list"
    echo 'deb http://deb.debian.org/debian-security bookworm-security main' >>"$d/sources.list"
    local o=(-o "Dir::Etc::sourcelist=$d/sources.list" -o Dir::Etc::sourceparts=-
             -o "Dir::State::lists=$d/lists" -o "Dir::Cache::archives=$d/archives"
             -o APT::Sandbox::User=root)
    apt-get "${APT_OPTS[@]}" "${o[@]}" update >/dev/null &&
        apt-get "${APT_OPTS[@]}" "${o[@]}" -t bookworm-backports --no-remove \
            --no-install-recommends install "qemu-system-x86=$v" "qemu-system-common=$v" \
            "qemu-system-data=$v" "qemu-utils=$v" || rc=$?
    rm -rf -- "$d"
    return "$rc"
}
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: must run as root to install qemu-system-x86" >&2
        exit 1
    fi
    install_qemu_system
fi

# The Rust toolchain is preinstalled via rustup; never download one here.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

status=0
for t in cc c++ pkg-config clang mkfs.ext4 debugfs e2fsck sfdisk losetup qemu-img fio b3sum zstd fusermount3 \
         qemu-system-x86_64 busybox syslinux mcopy mkfs.vfat cpio; do
    command -v "$t" >/dev/null 2>&1 || { echo "install-deps: missing tool after install: $t" >&2; status=1; }
done
if command -v cargo >/dev/null 2>&1; then
    echo "install-deps: $(cargo --version)"
else
    echo "install-deps: cargo not found (expected a rustup toolchain in ~/.cargo)" >&2
    status=1
fi
if [ "$PEERS" -eq 1 ]; then
    for t in casync borg restic /usr/bin/time; do
        command -v "$t" >/dev/null 2>&1 || { echo "install-deps: missing peer tool after install: $t" >&2; status=1; }
    done
fi
echo "install-deps: $(qemu-img --version | head -n1); $(qemu-system-x86_64 --version | head -n1)"
exit "$status"
