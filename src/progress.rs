//! Progress reporting for long operations. The library reports bytes; frontends draw bars.

/// Receives progress of one long operation (import, export, verify, restore).
pub trait Progress: Sync {
    /// The operation will cover `total` bytes.
    fn start(&self, _total: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    /// The operation ended (successfully or not).
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
