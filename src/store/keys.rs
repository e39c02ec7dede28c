//! Key-only iteration over a column family whose values live in blob files.
//!
//! rust-rocksdb's iterators resolve every BlobDB value as they step, so a scan of the chunk
//! keys (gc's search for orphans) read the whole store: 1 s per GB here, and at disk speed
//! when cold. RocksDB can defer that (`ReadOptions::allow_unprepared_value`): the iterator
//! then reads only the LSM tree. rust-rocksdb does not wrap the option, so this module drives
//! the C API directly, with the database and column family pointers rust-rocksdb exposes.

use std::ffi::{c_char, c_void, CStr};

use librocksdb_sys as ffi;
use rocksdb::{AsColumnFamilyRef, AsRawPtr};

use super::Store;
use crate::error::{Error, Result};

/// Owns a C read-options object and an iterator made with it; frees both on drop.
struct KeyIterator {
    options: *mut ffi::rocksdb_readoptions_t,
    iter: *mut ffi::rocksdb_iterator_t,
}

impl Drop for KeyIterator {
    fn drop(&mut self) {
        // SAFETY: both were created by `for_each_key` and are destroyed once, iterator first.
        unsafe {
            ffi::rocksdb_iter_destroy(self.iter);
            ffi::rocksdb_readoptions_destroy(self.options);
        }
    }
}

/// Calls `f` with every key of column family `name`, in order, without reading values.
/// Writes made by `f` are allowed (the iterator reads the state as of its creation).
pub(crate) fn for_each_key(
    store: &Store,
    name: &str,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let cf = store.cf(name);
    // SAFETY: the database and column family outlive the iterator (both borrowed from
    // `store` for this whole function); every pointer below comes from the C API and is
    // used as it documents; key slices are copied out by `f` before the next step.
    let it = unsafe {
        let options = ffi::rocksdb_readoptions_create();
        ffi::rocksdb_readoptions_set_allow_unprepared_value(options, 1);
        ffi::rocksdb_readoptions_set_fill_cache(options, 0);
        let iter = ffi::rocksdb_create_iterator_cf(store.db().as_raw_ptr(), options, cf.inner());
        KeyIterator { options, iter }
    };
    unsafe { ffi::rocksdb_iter_seek_to_first(it.iter) };
    while unsafe { ffi::rocksdb_iter_valid(it.iter) } != 0 {
        let mut len: usize = 0;
        // SAFETY: valid iterator; the key stays valid until the next step.
        let key = unsafe {
            let ptr = ffi::rocksdb_iter_key(it.iter, &mut len);
            std::slice::from_raw_parts(ptr as *const u8, len)
        };
        f(key)?;
        unsafe { ffi::rocksdb_iter_next(it.iter) };
    }
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: the C API writes an error string it allocated, or leaves null.
    unsafe { ffi::rocksdb_iter_get_error(it.iter, &mut err) };
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string from the C API, freed with its allocator.
    let message = unsafe {
        let s = CStr::from_ptr(err).to_string_lossy().into_owned();
        ffi::rocksdb_free(err as *mut c_void);
        s
    };
    Err(Error::io(
        format!("scan the {name} keys of store {}", store.path().display()),
        std::io::Error::other(message),
    ))
}
