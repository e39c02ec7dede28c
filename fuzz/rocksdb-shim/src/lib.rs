//! Stand-in for the one rocksdb type src/store/codec.rs names, so the fuzz crate can
//! compile codec.rs without building RocksDB.

/// Merge operands: a list of byte strings.
pub struct MergeOperands(pub Vec<Vec<u8>>);

impl<'a> IntoIterator for &'a MergeOperands {
    type Item = &'a [u8];
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Vec<u8>>, fn(&'a Vec<u8>) -> &'a [u8]>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(Vec::as_slice)
    }
}
