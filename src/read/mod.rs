//! The image reader: (offset, length) -> bytes, shared by FUSE, export, restore and verify.
//!
//! An image's extent map is loaded once (about 50 bytes per 64 KiB of data) and searched
//! by binary search. Data chunks are read from the store, decompressed and checked against
//! their BLAKE3 id; decoded chunks are kept in a bounded [`ChunkCache`] shared by every
//! reader of a process, so concurrent readers of related images share decoded chunks too.

mod overlap;

use std::sync::Arc;

use rayon::prelude::*;

pub use overlap::{prepare_while_writing, WriteBehind};

use crate::catalog::{Catalog, ImageRecord};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::store::codec::Extent;
use crate::store::{Store, StoredValue};

#[derive(Clone)]
struct ByLength;

impl quick_cache::Weighter<ChunkId, Decoded> for ByLength {
    fn weight(&self, _key: &ChunkId, val: &Decoded) -> u64 {
        val.len() as u64
    }
}

/// A decoded chunk, shared. (`Arc<Vec>` rather than `Arc<[u8]>`: the decoder's buffer moves
/// in without a copy; `Arc::<[u8]>::from(Vec)` copied every chunk, 8% of a mount's CPU.)
pub type Decoded = Arc<Vec<u8>>;

/// A bounded cache of decoded chunks, weighed in bytes.
pub struct ChunkCache {
    inner: quick_cache::sync::Cache<ChunkId, Decoded, ByLength>,
}

impl ChunkCache {
    /// A cache holding at most `bytes` of decoded chunk data.
    pub fn new(bytes: u64) -> Self {
        let items = (bytes / (64 * 1024)).max(16) as usize;
        ChunkCache {
            inner: quick_cache::sync::Cache::with_weighter(items, bytes.max(1), ByLength),
        }
    }

    /// The decoded chunk `id` if the cache holds it (no load, no insert).
    pub fn peek(&self, id: &ChunkId) -> Option<Decoded> {
        self.inner.get(id)
    }
}

/// Decode buffers handed back after use, so that a read decodes into memory it has touched
/// before: on this kind of VM the first touch of fresh pages was a fifth of a cold random
/// read's CPU (each miss allocated a new chunk-sized buffer while the cache grew).
pub struct BufferPool {
    free_tx: crossbeam_channel::Sender<Vec<u8>>,
    free_rx: crossbeam_channel::Receiver<Vec<u8>>,
}

impl BufferPool {
    /// A pool keeping at most `buffers` spare buffers (more are freed).
    pub fn new(buffers: usize) -> Arc<Self> {
        let (free_tx, free_rx) = crossbeam_channel::bounded(buffers.max(1));
        Arc::new(BufferPool { free_tx, free_rx })
    }

    /// Frees every spare buffer (an idle mount hands their memory back); how many.
    pub fn drain(&self) -> usize {
        std::iter::from_fn(|| self.free_rx.try_recv().ok()).count()
    }

    /// Spare buffers held now.
    pub fn spares(&self) -> usize {
        self.free_rx.len()
    }

    /// A spare buffer (empty if none is spare), returned to the pool when dropped.
    pub fn take(self: &Arc<Self>) -> Recycled {
        Recycled {
            buf: self.free_rx.try_recv().unwrap_or_default(),
            pool: self.clone(),
        }
    }
}

/// A buffer of a [`BufferPool`], back in the pool when dropped.
pub struct Recycled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl std::ops::Deref for Recycled {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl std::ops::DerefMut for Recycled {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        // A full pool frees the buffer.
        let _ = self.pool.free_tx.try_send(std::mem::take(&mut self.buf));
    }
}

/// Reads one image.
pub struct ImageReader {
    /// The snapshot chunks are read from; a mount moves a long-open reader to newer ones
    /// (see [`ImageReader::rebase`]).
    store: std::sync::RwLock<Arc<Store>>,
    image: ImageRecord,
    extents: Vec<Extent>,
    cache: Arc<ChunkCache>,
    /// Keeps gc from freeing the chunks while this reader lives (see [`ImageReader::open_pinned`]).
    _pin: Option<crate::store::pins::Pin>,
}

impl ImageReader {
    /// Loads the extent map of `image`.
    pub fn open(store: Arc<Store>, image: ImageRecord, cache: Arc<ChunkCache>) -> Result<Self> {
        let extents = Catalog::new(&store).extents(&image)?;
        Ok(ImageReader {
            store: std::sync::RwLock::new(store),
            image,
            extents,
            cache,
            _pin: None,
        })
    }

    /// Like [`ImageReader::open`], for a one-pass reader beside the writer (export,
    /// restore): the image's chunks are pinned (see [`crate::store::pins`]) for the reader's
    /// life, so a concurrent `delete` + `gc` cannot free them mid-read. Fails with
    /// [`Error::ImageNotFound`] when the image was deleted before the pin was in place.
    pub fn open_pinned(
        store: Arc<Store>,
        image: ImageRecord,
        cache: Arc<ChunkCache>,
    ) -> Result<Self> {
        let mut reader = Self::open(store, image, cache)?;
        reader._pin = crate::store::pins::hold(&reader.store(), &reader.image, &reader.extents)?;
        Ok(reader)
    }

    /// The image being read.
    pub fn image(&self) -> &ImageRecord {
        &self.image
    }

    /// Its extents, in offset order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The store it reads from (the snapshot of the moment).
    pub fn store(&self) -> Arc<Store> {
        self.store.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads from `snapshot`, a later snapshot of the same store, from now on. The caller
    /// guarantees that it holds every chunk of the image (the image still exists there, or
    /// its chunks are pinned). A mount does this so that a file open for weeks does not keep
    /// the first snapshot, and with it every table and blob file it had open, after gc
    /// deleted them.
    pub fn rebase(&self, snapshot: Arc<Store>) {
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }

    /// Size of the image.
    pub fn size(&self) -> u64 {
        self.image.virtual_size
    }

    /// Index of the extent containing `offset` (`extents.len()` at or past the end).
    pub fn extent_index(&self, offset: u64) -> usize {
        self.extents.partition_point(|e| e.end() <= offset)
    }

    /// Loads a data extent's chunk without touching the cache (for one-pass readers such
    /// as export and verify, which would only evict what mounts need).
    pub fn load(&self, extent: &Extent) -> Result<Vec<u8>> {
        let Some(id) = extent.chunk else {
            return Ok(vec![0; extent.len as usize]);
        };
        self.checked(extent, self.store().read_chunk(&id))
    }

    /// Decodes a data extent's chunk into `out` (resized to the extent's length), checked,
    /// without touching the cache; zeros for a zero extent.
    pub fn decode_into(&self, extent: &Extent, out: &mut Vec<u8>) -> Result<()> {
        // Old contents need no clearing: the decoder writes every byte or fails.
        out.resize(extent.len as usize, 0);
        match extent.chunk {
            None => {
                out.fill(0);
                Ok(())
            }
            Some(id) => self
                .store()
                .read_chunk_into(&id, out)
                .map_err(|reason| self.corrupt(extent, reason)),
        }
    }

    /// The decoded chunk of a data extent if the cache holds it.
    pub fn cached(&self, extent: &Extent) -> Option<Decoded> {
        extent.chunk.and_then(|id| self.cache.peek(&id))
    }

    /// A decoded chunk for `extent`, or the error naming the image and offset.
    fn checked(
        &self,
        extent: &Extent,
        decoded: std::result::Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>> {
        let raw = decoded.map_err(|reason| self.corrupt(extent, reason))?;
        if raw.len() as u64 != extent.len {
            return Err(self.corrupt(
                extent,
                format!(
                    "chunk holds {} bytes, the extent needs {}",
                    raw.len(),
                    extent.len
                ),
            ));
        }
        Ok(raw)
    }

    /// A data extent's chunk, through the cache.
    pub fn chunk(&self, extent: &Extent) -> Result<Decoded> {
        let Some(id) = extent.chunk else {
            return Ok(Arc::new(vec![0u8; extent.len as usize]));
        };
        self.cache
            .inner
            .get_or_insert_with(&id, || self.load(extent).map(Arc::new))
    }

    fn corrupt(&self, extent: &Extent, reason: String) -> Error {
        let err = Error::CorruptChunk {
            image: self.image.name.clone(),
            offset: extent.offset,
            chunk: extent.chunk.unwrap_or(ChunkId([0; 32])),
            reason,
        };
        // Returned, not logged here: the CLI prints it once; the mount logs failed requests.
        tracing::debug!("{err}");
        err
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many (short only at the end).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.size() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.size() - offset) as usize;
        let mut done = 0usize;
        let mut idx = self.extent_index(offset);
        while done < want {
            let Some(extent) = self.extents.get(idx) else {
                break;
            };
            let pos = offset + done as u64;
            let within = (pos - extent.offset) as usize;
            let n = ((extent.len as usize) - within).min(want - done);
            match extent.chunk {
                None => buf[done..done + n].fill(0),
                Some(_) => {
                    let data = self.chunk(extent)?;
                    buf[done..done + n].copy_from_slice(&data[within..within + n]);
                }
            }
            done += n;
            idx += 1;
        }
        Ok(done)
    }

    /// The start of the extent holding `offset` (the image's size at or past the end).
    pub fn extent_start(&self, offset: u64) -> u64 {
        self.extents
            .get(self.extent_index(offset))
            .map_or(self.size(), |e| e.offset)
    }

    /// Decodes the image's bytes `span` (a run of whole extents)
    /// into `out`, data chunks in parallel, each checked; `out`'s old contents are
    /// overwritten. The stored values come from one batched read (on a cold store RocksDB
    /// reads each blob file in offset order), so the calling thread waits for the disk and
    /// the decoding runs on rayon's. For sequential readers: one buffer, no per-chunk
    /// allocation, and no copy when answering from it.
    pub fn decode_span(&self, span: std::ops::Range<u64>, out: &mut Vec<u8>) -> Result<()> {
        let first = self.extent_index(span.start);
        let last = self.extent_index(span.end);
        let extents = &self.extents[first..last.max(first)];
        let starts_right = extents.first().is_none_or(|e| e.offset == span.start);
        let ends_right = extents.last().map_or(span.start, |e| e.end()) == span.end;
        if !starts_right || !ends_right {
            return Err(Error::invalid(
                "span",
                format!(
                    "{}..{} of image {} is not whole extents",
                    span.start, span.end, self.image.name
                ),
            ));
        }
        let store = self.store();
        let values = store.fetch_chunks(&chunk_ids(extents));
        out.resize((span.end - span.start) as usize, 0);
        self.decode_fetched_at(extents, values, span.start, out)
    }

    /// Decodes `extents` (sorted, each touching the image range `start..start + out.len()`)
    /// from their fetched `values` (one per data extent, in order) straight into their places
    /// in `out`, which holds that range: data chunks in parallel on rayon's threads, each
    /// checked against its id; zero extents become zeros; bytes no extent covers are left as
    /// they are. An extent reaching past either end of the range (a chunk across the edge of
    /// a writer's aligned window) is decoded whole aside and only its part inside is copied.
    /// Export decodes into its `O_DIRECT` window this way, with no copy of the bytes after.
    pub fn decode_fetched_at(
        &self,
        extents: &[Extent],
        values: Vec<Fetched<'_>>,
        start: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let end = start + out.len() as u64;
        let mut values = values.into_iter();
        let mut parts = Vec::with_capacity(extents.len());
        let (mut rest, mut rest_at) = (out, start);
        for e in extents {
            let (from, to) = (e.offset.max(start), e.end().min(end));
            if from >= to || from < rest_at {
                return Err(Error::invalid(
                    "extents",
                    format!(
                        "{}..{} of image {} is outside {start}..{end} or out of order",
                        e.offset,
                        e.end(),
                        self.image.name
                    ),
                ));
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((from - rest_at) as usize);
            let (part, tail) = tail.split_at_mut((to - from) as usize);
            let value = e
                .chunk
                .map(|_| values.next().unwrap_or_else(|| Err("not fetched".into())));
            parts.push((e, from - e.offset, part, value));
            (rest, rest_at) = (tail, to);
        }
        parts
            .into_par_iter()
            .try_for_each(|(e, skip, part, value)| match (e.chunk, value) {
                (Some(id), Some(value)) => {
                    let whole = skip == 0 && part.len() as u64 == e.len;
                    let decoded = value.and_then(|v| {
                        if whole {
                            return Store::decode_checked_into(&id, v.as_ref(), part);
                        }
                        let raw = Store::decode_checked(&id, v.as_ref())?;
                        if raw.len() as u64 != e.len {
                            let n = raw.len();
                            return Err(format!(
                                "chunk holds {n} bytes, the extent needs {}",
                                e.len
                            ));
                        }
                        // `part` lies inside the extent: skip + part.len() <= e.len.
                        part.copy_from_slice(&raw[skip as usize..skip as usize + part.len()]);
                        Ok(())
                    });
                    decoded.map_err(|reason| self.corrupt(e, reason))
                }
                _ => {
                    part.fill(0);
                    Ok(())
                }
            })
    }

    /// The start of the first data at or after `offset` (SEEK_DATA), `None` if only zeros follow.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        let idx = self.extent_index(offset);
        self.extents[idx..]
            .iter()
            .find(|e| e.chunk.is_some())
            .map(|e| e.offset.max(offset))
    }

    /// The start of the first zero run at or after `offset` (SEEK_HOLE); the end of the
    /// image counts as a hole.
    pub fn next_hole(&self, offset: u64) -> u64 {
        let idx = self.extent_index(offset);
        self.extents[idx..]
            .iter()
            .find(|e| e.chunk.is_none())
            .map_or(self.size(), |e| e.offset.max(offset))
    }
}

/// Data bytes a one-pass reader (export, verify) decodes per parallel window.
pub const WINDOW: u64 = 16 << 20;

/// Windows a one-pass reader fetches ahead of its decoding.
pub const FETCH_AHEAD: usize = 2;

/// Splits `items` into consecutive runs, each ending at the item that brings it to `limit`
/// bytes or more (by `bytes`); the last run may hold less. How one-pass readers cut their
/// work into [`WINDOW`]s.
pub fn split_by_bytes<T>(items: &[T], bytes: impl Fn(&T) -> u64, limit: u64) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let (mut start, mut sum) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        sum += bytes(item);
        if sum >= limit {
            runs.push(&items[start..=i]);
            (start, sum) = (i + 1, 0);
        }
    }
    if start < items.len() {
        runs.push(&items[start..]);
    }
    runs
}

/// The chunk ids of the data extents of `extents`, in order.
pub fn chunk_ids(extents: &[Extent]) -> Vec<ChunkId> {
    extents.iter().filter_map(|e| e.chunk).collect()
}

/// A stored chunk value fetched ahead, or why it could not be read.
pub type Fetched<'a> = std::result::Result<StoredValue<'a>, String>;

/// Runs `body` while a thread of its own reads the stored values of `batches` of chunks, in
/// order, at most `lead` batches ahead of `body` ([`FetchAhead::next_batch`] hands over the next
/// batch). For one-pass readers (export, verify): on a cold store the disk reads stream from
/// one batched `MultiGet` per batch and overlap the decoding of the batch before, instead of
/// each decoding thread waiting for its own small read; on a warm one they cost what the
/// decoders' own reads would.
pub fn with_fetch_ahead<'a, T>(
    store: &'a Store,
    batches: &'a [Vec<ChunkId>],
    lead: usize,
    body: impl FnOnce(&mut FetchAhead<'a>) -> T,
) -> T {
    std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<Fetched<'a>>>(lead.max(1));
        let spawned = std::thread::Builder::new()
            .name("imgvault-fetch".into())
            .spawn_scoped(s, move || {
                for ids in batches {
                    if tx.send(store.fetch_chunks(ids)).is_err() {
                        return; // the body is done
                    }
                }
            });
        let mut fetch = FetchAhead {
            store,
            batches,
            next: 0,
            fetched: spawned.is_ok().then_some(rx),
        };
        body(&mut fetch)
    })
}

/// Pairs each of `items` with its fetched value, in order; an item without one gets an error
/// (so a short batch fails those items instead of silently skipping them).
pub fn pair_fetched<'i, 'v, T>(
    items: &'i [T],
    values: Vec<Fetched<'v>>,
) -> Vec<(&'i T, Fetched<'v>)> {
    let mut values = values.into_iter();
    items
        .iter()
        .map(|item| {
            (
                item,
                values.next().unwrap_or_else(|| Err("not fetched".into())),
            )
        })
        .collect()
}

/// The body's side of [`with_fetch_ahead`].
pub struct FetchAhead<'a> {
    store: &'a Store,
    batches: &'a [Vec<ChunkId>],
    next: usize,
    fetched: Option<crossbeam_channel::Receiver<Vec<Fetched<'a>>>>,
}

impl<'a> FetchAhead<'a> {
    /// The values of the next batch, in the order of its ids (empty past the last batch).
    pub fn next_batch(&mut self) -> Vec<Fetched<'a>> {
        let Some(ids) = self.batches.get(self.next) else {
            return Vec::new();
        };
        self.next += 1;
        if let Some(rx) = &self.fetched {
            if let Ok(values) = rx.recv() {
                return values;
            }
            self.fetched = None; // no thread (it could not start): read here
        }
        self.store.fetch_chunks(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::{split_by_bytes, BufferPool};

    #[test]
    fn buffer_pool_hands_back_used_buffers_and_frees_beyond_its_size() {
        let pool = BufferPool::new(1);
        let mut a = pool.take();
        assert_eq!(a.capacity(), 0, "an empty pool gives a new buffer");
        a.resize(100_000, 7);
        let mut b = pool.take();
        b.resize(50_000, 1);
        drop(a); // kept
        drop(b); // pool full: freed
        let again = pool.take();
        assert!(again.capacity() >= 100_000, "the first buffer comes back");
        assert_eq!(pool.take().capacity(), 0, "only one buffer was kept");
    }

    #[test]
    fn split_by_bytes_ends_runs_at_the_limit_and_keeps_every_item() {
        let lens = [5u64, 5, 10, 1, 0, 0, 9, 3];
        let runs = split_by_bytes(&lens, |&n| n, 10);
        assert_eq!(runs, vec![&[5, 5][..], &[10], &[1, 0, 0, 9], &[3]]);
        // Zero-byte items never end a run on their own; an empty input gives no run.
        assert_eq!(split_by_bytes(&[0u64, 0], |&n| n, 10), vec![&[0, 0][..]]);
        assert!(split_by_bytes(&[] as &[u64], |&n| n, 10).is_empty());
    }
}
