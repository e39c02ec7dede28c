#!/usr/bin/env python3
"""window-reuse.py IMAGE...: for each image in order, how many of its aligned windows (256 KiB,
1 MiB, 4 MiB) hold the same bytes at the same offset as in an earlier image of the list: the
share of the whole-disk checksum a store that imported the earlier images does not hash again
(docs/ARCHITECTURE.md, "The whole-disk checksum hashes only new windows").

Example: benches/window-reuse.py /tmp/imgvault-peers/images/{a,b,c,d}.img   (~1 minute)
"""
import hashlib
import sys


def window_digests(path, size):
    with open(path, "rb") as f:
        while True:
            block = f.read(size)
            if not block:
                return
            yield hashlib.blake2b(block, digest_size=16).digest()


def main(images):
    if not images:
        sys.exit(__doc__)
    for size in (256 << 10, 1 << 20, 4 << 20):
        seen = set()
        for path in images:
            keys = list(enumerate(window_digests(path, size)))
            reused = sum(1 for k in keys if k in seen)
            print(f"{size >> 10} KiB windows: {path}: {reused} of {len(keys)} seen before "
                  f"({reused / max(len(keys), 1):.1%})")
            seen.update(keys)


if __name__ == "__main__":
    main(sys.argv[1:])
