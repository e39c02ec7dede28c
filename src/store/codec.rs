//! Byte layouts of the values kept in RocksDB (documented in docs/FORMAT.md).

use crate::chunk::ChunkId;
use crate::error::{Error, Result};

/// Chunk value codec byte: payload is the chunk's bytes.
pub const CODEC_RAW: u8 = 0;
/// Chunk value codec byte: payload is one zstd frame.
pub const CODEC_ZSTD: u8 = 1;
/// Chunk value header: codec byte + raw length (u32 LE).
pub const CHUNK_HEADER: usize = 5;

/// Compresses `raw` with zstd at `level`, or stores it raw when zstd does not shrink it.
/// The compressor carries the level (one per worker thread, reused across chunks).
pub fn encode_chunk(raw: &[u8], compressor: &mut zstd::bulk::Compressor<'_>) -> Vec<u8> {
    let bound = zstd::zstd_safe::compress_bound(raw.len());
    let mut out = Vec::with_capacity(CHUNK_HEADER + bound);
    out.push(CODEC_ZSTD);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    // zstd writes after the header into the spare capacity: no zero-filling of the bound.
    let mut frame = std::io::Cursor::new(out);
    frame.set_position(CHUNK_HEADER as u64);
    match compressor.compress_to_buffer(raw, &mut frame) {
        Ok(n) if n < raw.len() => {
            let mut out = frame.into_inner();
            out.shrink_to_fit();
            out
        }
        // Incompressible (or a compressor failure, which only costs space): store raw.
        _ => encode_raw(raw),
    }
}

/// The stored form of an uncompressed chunk.
pub fn encode_raw(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER + raw.len());
    out.push(CODEC_RAW);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(raw);
    out
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// A stored value's codec byte, raw length and payload.
fn parse_value(value: &[u8]) -> std::result::Result<(u8, usize, &[u8]), String> {
    if value.len() < CHUNK_HEADER {
        return Err(format!(
            "value of {} bytes is shorter than its header",
            value.len()
        ));
    }
    let raw_len = u32::from_le_bytes([value[1], value[2], value[3], value[4]]) as usize;
    if raw_len > fastcdc::v2020::MAXIMUM_MAX {
        return Err(format!("raw length {raw_len} exceeds the largest chunk"));
    }
    Ok((value[0], raw_len, &value[CHUNK_HEADER..]))
}

/// A raw (uncompressed) payload, checked against the header's length.
fn raw_payload(payload: &[u8], raw_len: usize) -> std::result::Result<&[u8], String> {
    if payload.len() != raw_len {
        return Err(format!(
            "raw payload is {} bytes, header says {raw_len}",
            payload.len()
        ));
    }
    Ok(payload)
}

/// Runs `f` with this thread's zstd decompression context (creating one per chunk cost ~1%
/// of export).
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::result::Result<T, String> {
    DECOMPRESSOR
        .with(|d| match &mut *d.borrow_mut() {
            Some(d) => f(d),
            None => zstd::bulk::Decompressor::new().and_then(|mut d| f(&mut d)),
        })
        .map_err(|e| format!("zstd: {e}"))
}

fn check_decoded(n: usize, raw_len: usize) -> std::result::Result<(), String> {
    if n != raw_len {
        return Err(format!("decompressed to {n} bytes, header says {raw_len}"));
    }
    Ok(())
}

/// Decodes a stored chunk value into its raw bytes. Errors describe the damage.
pub fn decode_chunk(value: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let (codec, raw_len, payload) = parse_value(value)?;
    let out = match codec {
        CODEC_RAW => raw_payload(payload, raw_len)?.to_vec(),
        // The capacity bound makes a frame that claims more than raw_len fail.
        CODEC_ZSTD => with_decompressor(|d| d.decompress(payload, raw_len))?,
        c => return Err(format!("unknown codec byte {c}")),
    };
    check_decoded(out.len(), raw_len)?;
    Ok(out)
}

/// Decodes a stored chunk value into `out`, which must be exactly the chunk's raw length
/// (the extent's length). Errors describe the damage, as for [`decode_chunk`].
pub fn decode_chunk_into(value: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    let (codec, raw_len, payload) = parse_value(value)?;
    if raw_len != out.len() {
        return Err(format!(
            "chunk holds {raw_len} bytes, the extent needs {}",
            out.len()
        ));
    }
    let n = match codec {
        CODEC_RAW => {
            out.copy_from_slice(raw_payload(payload, raw_len)?);
            raw_len
        }
        CODEC_ZSTD => with_decompressor(|d| d.decompress_to_buffer(payload, out))?,
        c => return Err(format!("unknown codec byte {c}")),
    };
    check_decoded(n, raw_len)
}

/// Reference-count record: how many extents use a chunk, and its sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefEntry {
    /// Number of extents (over all images) naming the chunk.
    pub count: i64,
    /// Bytes the chunk value occupies (header + payload).
    pub stored_len: u32,
    /// Uncompressed length.
    pub raw_len: u32,
}

/// Encoded size of a [`RefEntry`].
pub const REF_LEN: usize = 16;

impl RefEntry {
    /// The 16-byte encoding: count i64 LE, stored u32 LE, raw u32 LE.
    pub fn encode(&self) -> [u8; REF_LEN] {
        let mut b = [0u8; REF_LEN];
        b[..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        b[12..].copy_from_slice(&self.raw_len.to_le_bytes());
        b
    }

    /// Decodes a value written by [`RefEntry::encode`].
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != REF_LEN {
            return None;
        }
        Some(RefEntry {
            count: i64::from_le_bytes(b[..8].try_into().ok()?),
            stored_len: u32::from_le_bytes(b[8..12].try_into().ok()?),
            raw_len: u32::from_le_bytes(b[12..].try_into().ok()?),
        })
    }

    /// Combines a merge operand into this entry: counts add, sizes fill in when known.
    pub fn absorb(&mut self, op: &RefEntry) {
        self.count += op.count;
        if op.stored_len != 0 {
            self.stored_len = op.stored_len;
        }
        if op.raw_len != 0 {
            self.raw_len = op.raw_len;
        }
    }
}

/// The `refs` column family's merge operator (associative: operands are entries too).
pub fn merge_refs(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    // An undecodable existing value is treated as empty so that a damaged entry is
    // rebuilt by the next merge instead of failing every write; verify reports it.
    let mut acc = existing.and_then(RefEntry::decode).unwrap_or_default();
    for op in operands {
        if let Some(op) = RefEntry::decode(op) {
            acc.absorb(&op);
        }
    }
    Some(acc.encode().to_vec())
}

/// One extent of an image: a data chunk or a zero run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Logical byte offset in the image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The chunk holding the bytes, or `None` for zeros.
    pub chunk: Option<ChunkId>,
}

impl Extent {
    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

const EXTENT_ZERO: u8 = 0;
const EXTENT_DATA: u8 = 1;

/// `extents` key: image id (16 bytes) + offset (u64 BE), so a prefix scan is in offset order.
pub fn extent_key(image: &[u8; 16], offset: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(image);
    k[16..].copy_from_slice(&offset.to_be_bytes());
    k
}

/// `extents` value: kind byte, length u64 LE, then the chunk id for data extents.
pub fn encode_extent(e: &Extent) -> Vec<u8> {
    let mut v = Vec::with_capacity(41);
    v.push(if e.chunk.is_some() {
        EXTENT_DATA
    } else {
        EXTENT_ZERO
    });
    v.extend_from_slice(&e.len.to_le_bytes());
    if let Some(id) = &e.chunk {
        v.extend_from_slice(&id.0);
    }
    v
}

/// Decodes an `extents` key/value pair.
pub fn decode_extent(key: &[u8], value: &[u8]) -> Result<Extent> {
    let corrupt = |reason: &str| Error::CorruptRecord {
        what: "extent",
        key: hex::encode(key),
        reason: reason.to_string(),
    };
    if key.len() != 24 {
        return Err(corrupt("key is not 24 bytes"));
    }
    let offset = u64::from_be_bytes(key[16..].try_into().map_err(|_| corrupt("key"))?);
    if value.len() < 9 {
        return Err(corrupt("value shorter than 9 bytes"));
    }
    let len = u64::from_le_bytes(value[1..9].try_into().map_err(|_| corrupt("length"))?);
    let chunk = match (value[0], value.len()) {
        (EXTENT_ZERO, 9) => None,
        (EXTENT_DATA, 41) => ChunkId::from_slice(&value[9..]),
        _ => return Err(corrupt("unknown kind or wrong length")),
    };
    if len == 0 || offset.checked_add(len).is_none() {
        return Err(corrupt("empty or overflowing extent"));
    }
    if chunk.is_some() && len > fastcdc::v2020::MAXIMUM_MAX as u64 {
        return Err(corrupt("data extent longer than the largest chunk"));
    }
    Ok(Extent { offset, len, chunk })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any chunk, from all-repeats to noise and up to the largest FastCDC chunk, decodes
        /// to itself, into a new buffer and into an exact slice, and is never stored larger
        /// than raw plus the header.
        #[test]
        fn any_chunk_round_trips_through_the_codec(
            len in 0..=fastcdc::v2020::MAXIMUM_MAX,
            alphabet in 1u32..=256,
            seed: u64,
        ) {
            let mut x = seed | 1;
            let raw: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % u64::from(alphabet)) as u8
                })
                .collect();
            let mut c = zstd::bulk::Compressor::new(3).unwrap();
            let enc = encode_chunk(&raw, &mut c);
            proptest::prop_assert!(enc.len() <= CHUNK_HEADER + raw.len());
            proptest::prop_assert_eq!(&decode_chunk(&enc).unwrap(), &raw);
            let mut out = vec![0xA5; raw.len()];
            decode_chunk_into(&enc, &mut out).unwrap();
            proptest::prop_assert_eq!(out, raw);
        }
    }

    #[test]
    fn chunk_codec_round_trips_and_stores_incompressible_raw() {
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let text = b"hello hello hello hello hello hello hello".repeat(100);
        let enc = encode_chunk(&text, &mut c);
        assert_eq!(enc[0], CODEC_ZSTD);
        assert!(enc.len() < text.len());
        assert_eq!(decode_chunk(&enc).unwrap(), text);
        let noise: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let enc = encode_chunk(&noise, &mut c);
        assert_eq!(decode_chunk(&enc).unwrap(), noise);
        assert!(decode_chunk(&[9, 0, 0, 0, 0]).is_err());
        assert!(decode_chunk(&[0, 5, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn refs_merge_adds_counts_and_keeps_sizes() {
        let mut a = RefEntry {
            count: 2,
            stored_len: 10,
            raw_len: 20,
        };
        a.absorb(&RefEntry {
            count: -1,
            stored_len: 0,
            raw_len: 0,
        });
        assert_eq!(
            a,
            RefEntry {
                count: 1,
                stored_len: 10,
                raw_len: 20
            }
        );
        assert_eq!(RefEntry::decode(&a.encode()), Some(a));
    }

    #[test]
    fn extent_codec_round_trips() {
        let id = [7u8; 16];
        for e in [
            Extent {
                offset: 4096,
                len: 65536,
                chunk: Some(ChunkId([3; 32])),
            },
            Extent {
                offset: 1 << 40,
                len: 1 << 30,
                chunk: None,
            },
        ] {
            let k = extent_key(&id, e.offset);
            assert_eq!(decode_extent(&k, &encode_extent(&e)).unwrap(), e);
        }
        assert!(decode_extent(&extent_key(&id, 0), &[1, 0]).is_err());
    }
}
