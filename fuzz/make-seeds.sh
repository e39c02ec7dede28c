#!/usr/bin/env bash
# Seed corpora for the fuzz targets, made with qemu-img from a small disk with data,
# zeros and a repeated pattern. Usage: fuzz/make-seeds.sh [CORPUS_DIR] (default fuzz/corpus)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/corpus}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# A 1 MiB disk: random bytes, text, a zero gap and a pattern.
head -c 1048576 /dev/zero > disk.raw
head -c 65536 /dev/urandom | dd of=disk.raw conv=notrunc bs=1 seek=4096 status=none
printf 'imgvault fuzz seed %.0s' $(seq 1 2000) | dd of=disk.raw conv=notrunc bs=1 seek=327680 status=none
qemu-io -f raw -c 'write -P 0xa5 786432 131072' disk.raw >/dev/null

mk() { qemu-img convert -q -f raw "$@"; }
mkdir -p "$out"/{qcow2,vmdk,vhd,vhdx,probe,codec}
mk -O qcow2 -o cluster_size=512 disk.raw "$out/qcow2/small-clusters.qcow2"
mk -O qcow2 -o cluster_size=4096 disk.raw "$out/qcow2/v3.qcow2"
mk -O qcow2 -o cluster_size=4096,compat=0.10 disk.raw "$out/qcow2/v2.qcow2"
mk -O qcow2 -c -o cluster_size=4096 disk.raw "$out/qcow2/zlib.qcow2"
mk -O qcow2 -c -o cluster_size=4096,compression_type=zstd disk.raw "$out/qcow2/zstd.qcow2" || true
qemu-img create -q -f qcow2 -o cluster_size=4096 -b "$out/qcow2/v3.qcow2" -F qcow2 "$out/qcow2/overlay.qcow2"
qemu-io -c 'write -P 0x5a 8192 8192' -c 'write -z 65536 65536' "$out/qcow2/overlay.qcow2" >/dev/null
mk -O vmdk disk.raw "$out/vmdk/sparse.vmdk"
mk -O vmdk -o subformat=streamOptimized disk.raw "$out/vmdk/stream.vmdk"
mk -O vpc -o subformat=dynamic disk.raw "$out/vhd/dynamic.vhd"
mk -O vpc -o subformat=fixed disk.raw "$out/vhd/fixed.vhd"
mk -O vhdx -o subformat=dynamic,log_size=1M,block_size=1M disk.raw "$out/vhdx/dynamic.vhdx"
mk -O vhdx -o subformat=fixed,log_size=1M,block_size=1M disk.raw "$out/vhdx/fixed.vhdx" || true
# qemu lays VHDX regions out on 1 MiB boundaries (9-10 MiB files): repack them into
# 2 MiB seeds (BAT at 320 KiB, metadata at 384 KiB, payload from 2 MiB, after the 1 MiB log) so that
# libFuzzer's mutations stay fast.
python3 - "$out/vhdx" <<'PY'
import os, struct, sys
def crc32c(b):
    c = 0xFFFFFFFF
    for x in b:
        c ^= x
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF
for name in os.listdir(sys.argv[1]):
    p = os.path.join(sys.argv[1], name)
    d = open(p, "rb").read()
    t = d[192*1024:256*1024]
    n = struct.unpack("<I", t[8:12])[0]
    regs = [(t[16+i*32:32+i*32], *struct.unpack("<QII", t[32+i*32:48+i*32])) for i in range(n)]
    bat = next(r for r in regs if r[0].hex().startswith("6677c22d"))
    meta = next(r for r in regs if r[0].hex().startswith("06a27c8b"))
    out = bytearray(d[:320*1024]) + bytearray(2*1024*1024 - 320*1024)
    entries = bytearray(d[bat[1]:bat[1]+64*1024])
    data = bytearray()
    next_mb = 2
    for i in range(0, len(entries), 8):
        e = struct.unpack("<Q", entries[i:i+8])[0]
        if e & 7 == 6:
            off = e & ~0xFFFFF
            blk = d[off:off+1024*1024]
            data += blk
            entries[i:i+8] = struct.pack("<Q", (e & 0xFFFFF) | (next_mb << 20))
            next_mb += 1
    out[320*1024:384*1024] = entries
    out[384*1024:512*1024] = d[meta[1]:meta[1]+128*1024]
    out += data
    rt = bytearray(64*1024)
    rt[0:4] = b"regi"
    rt[8:12] = struct.pack("<I", 2)
    rt[16:48] = bat[0] + struct.pack("<QII", 320*1024, 64*1024, 1)
    rt[48:80] = meta[0] + struct.pack("<QII", 384*1024, 128*1024, 1)
    rt[4:8] = struct.pack("<I", crc32c(bytes(rt)))
    out[192*1024:256*1024] = rt
    out[256*1024:320*1024] = rt
    open(p, "wb").write(out)
PY
for d in qcow2 vmdk vhd vhdx; do cp "$out/$d"/* "$out/probe/"; done

# codec: a zstd chunk value, a raw one, a zero and a data extent (key + value), a ref entry.
python3 - "$out/codec" <<'PY'
import os, struct, sys, subprocess
d = sys.argv[1]
raw = b"chunk " * 100
z = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True).stdout
open(f"{d}/chunk-zstd", "wb").write(bytes([1]) + struct.pack("<I", len(raw)) + z)
open(f"{d}/chunk-raw", "wb").write(bytes([0]) + struct.pack("<I", 5) + b"hello")
key = bytes(range(16)) + struct.pack(">Q", 65536)
open(f"{d}/extent-zero", "wb").write(key + bytes([0]) + struct.pack("<Q", 1 << 20))
open(f"{d}/extent-data", "wb").write(key + bytes([1]) + struct.pack("<Q", 65536) + bytes(range(32)))
open(f"{d}/refs", "wb").write(struct.pack("<qII", 3, 1000, 65536))
PY
ls -lR "$out" | awk '{print $5, $9}' | grep -v '^ *$' || true
