//! The code under fuzzing, compiled from the main crate's sources without the store.

#![allow(dead_code)]

/// The format parsers, exactly as in src/formats/.
#[path = "../../src/formats"]
pub mod formats {
    pub mod disk;
    pub mod qcow2;
    pub mod vhd;
    pub mod vhdx;
    pub mod vmdk;
}

/// What src/store/codec.rs needs from `crate::chunk`.
pub mod chunk {
    /// A chunk id (BLAKE3 of the chunk), as in src/chunk/mod.rs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct ChunkId(pub [u8; 32]);

    impl ChunkId {
        /// From 32 bytes.
        pub fn from_slice(bytes: &[u8]) -> Option<Self> {
            bytes.try_into().ok().map(ChunkId)
        }
    }
}

/// What src/store/codec.rs needs from `crate::error`.
pub mod error {
    /// The variants codec.rs builds.
    #[derive(Debug)]
    pub enum Error {
        CorruptRecord {
            what: &'static str,
            key: String,
            reason: String,
        },
    }
    /// Result alias.
    pub type Result<T, E = Error> = std::result::Result<T, E>;
}

/// The RocksDB value codecs, exactly as in src/store/codec.rs.
#[path = "../../src/store/codec.rs"]
pub mod codec;

use formats::disk::{open_disk, probe, Format, OpenCtx, Run};

/// Most guest data bytes read per input (a tiny file may describe a 64 TiB disk).
const DATA_BUDGET: u64 = 4 << 20;
/// Most runs walked per input.
const RUN_BUDGET: u32 = 1024;

/// Opens `data` as `format` and reads the disk the way ingest does, within budgets.
pub fn drive(format: Format, data: &[u8]) {
    let bytes = data.to_vec();
    let _ = probe(&bytes);
    let Ok(mut disk) = open_disk(Box::new(bytes), format, &OpenCtx::memory()) else {
        return;
    };
    let size = disk.size();
    assert!(size <= formats::disk::MAX_VIRTUAL_SIZE);
    let mut pos = 0u64;
    let mut read = 0u64;
    let mut buf = Vec::new();
    for _ in 0..RUN_BUDGET {
        if pos >= size || read >= DATA_BUDGET {
            break;
        }
        let boundary = (4u64 << 20) - pos % (4 << 20);
        let Ok((kind, n)) = disk.run(pos, boundary.min(size - pos)) else {
            return;
        };
        assert!(n >= 1 && n <= size - pos, "run of {n} at {pos} of {size}");
        if kind == Run::Data {
            buf.resize(n as usize, 0);
            if disk.read(pos, &mut buf).is_err() {
                return;
            }
            read += n;
        }
        pos += n;
    }
}
