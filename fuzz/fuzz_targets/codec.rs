#![no_main]
//! The store's value decoders (src/store/codec.rs) on arbitrary bytes: chunk values,
//! extent key/value pairs and reference-count entries, as read back from RocksDB.

use imgvault_fuzz::codec::{
    decode_chunk, decode_chunk_into, decode_extent, encode_extent, extent_key, RefEntry,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The decoder into a caller's buffer (reads of the mount, export) agrees with the one
    // that allocates: the same bytes where it decodes, a refusal at any other length, and a
    // refusal where it does not (checked up to 256 KiB claimed: a 16 MiB zeroed buffer per
    // input would cut the rate thirtyfold).
    match decode_chunk(data) {
        Ok(raw) => {
            assert!(raw.len() <= fastcdc::v2020::MAXIMUM_MAX);
            let mut out = vec![0u8; raw.len()];
            assert_eq!(decode_chunk_into(data, &mut out), Ok(()));
            assert_eq!(out, raw);
            let mut longer = vec![0u8; raw.len() + 1];
            assert!(decode_chunk_into(data, &mut longer).is_err());
        }
        Err(_) => {
            let claimed = data
                .get(1..5)
                .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
            if claimed <= 256 << 10 {
                let mut out = vec![0u8; claimed];
                assert!(
                    decode_chunk_into(data, &mut out).is_err(),
                    "decode_chunk_into took a value decode_chunk refused"
                );
            }
        }
    }
    if data.len() >= 24 {
        let (key, value) = data.split_at(24);
        if let Ok(e) = decode_extent(key, value) {
            // A decoded extent re-encodes to what was read.
            let mut id = [0u8; 16];
            id.copy_from_slice(&key[..16]);
            assert_eq!(extent_key(&id, e.offset).as_slice(), key);
            assert_eq!(encode_extent(&e), value);
        }
    }
    if let Some(r) = RefEntry::decode(data) {
        assert_eq!(r.encode().as_slice(), data);
    }
});
