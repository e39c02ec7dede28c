#![no_main]
//! The store's value decoders (src/store/codec.rs) on arbitrary bytes: chunk values,
//! extent key/value pairs and reference-count entries, as read back from RocksDB.

use imgvault_fuzz::codec::{decode_chunk, decode_extent, encode_extent, extent_key, RefEntry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = decode_chunk(data) {
        assert!(raw.len() <= fastcdc::v2020::MAXIMUM_MAX);
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
