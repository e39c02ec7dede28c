//! Sequential streams: a file handle read front to back gets the bytes ahead of it decoded
//! into windows (runs of whole extents, decoded in parallel into one buffer each), and a
//! request that falls inside a window is answered straight from it.
//!
//! Compared with decoding ahead into the chunk cache, this saves a copy of every byte into
//! the request buffer, an allocation per chunk, and the cache's bookkeeping; the mount's
//! sequential read runs CPU-bound on the same cores as the reader, so that is time saved
//! (docs/PERFORMANCE.md, "Succession hints, the cache's share ..., sequential windows"). A
//! request that straddles two windows is copied together from both; requests in long zero
//! runs (nothing to decode), requests when the mount's window memory is taken, and random
//! reads take the chunk-cache path.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use crate::read::{BufferPool, ImageReader, Recycled};

/// Windows a stream keeps: the one being read and those decoding ahead of it.
pub(crate) const MAX_WINDOWS: usize = 6;

/// Largest window (`mount --prefetch-mb` asks for the size).
pub(crate) const MAX_WINDOW: u64 = 32 << 20;

/// A zero extent at least this long ends a window (and gets none): nothing to decode.
const LONG_ZEROS: u64 = 1 << 20;

/// A new stream decodes ahead about twice what it has read, at least twice this, up to the
/// full depth (see [`Stream::windows_for`]).
const FIRST_AHEAD: u64 = 512 << 10;

/// A request this large, near the previous one's end, counts as sequential: the kernel's
/// read-ahead sends requests of this size and more, on several threads, so they can arrive a
/// little out of order.
const LARGE_REQUEST: u64 = 64 << 10;

/// How far from the previous request's end a large request may start and still count as
/// sequential (a few read-ahead requests arriving out of order).
const SEQUENTIAL_SLACK: u64 = 2 << 20;

/// A stream starts when a handle's sequential requests in a row weigh this much: two large
/// ones (as before), or sixteen small ones. Random 4 KiB readers make short runs of adjacent
/// requests too (fio's random map hands out a pass's last free blocks in order), and each
/// such run started a stream whose first window decoded megabytes for a few pages; a reader
/// really sequential in small requests (`dd bs=4k iflag=direct`) gets its stream after 64 KiB.
const SEQUENTIAL_TRIGGER: u32 = 16;

/// The weight of a large sequential request (a small one weighs 1).
const LARGE_WEIGHT: u32 = SEQUENTIAL_TRIGGER / 2;

/// Tells a file handle's sequential reader from a random one, by its requests alone.
///
/// A request counts as sequential when it starts exactly where the previous one ended, or
/// when it is large ([`LARGE_REQUEST`]) and starts near there ([`SEQUENTIAL_SLACK`]). A
/// small request near the previous one but not adjacent neither counts nor breaks a streak:
/// random 4 KiB readers land near each other by chance (one pair in ~500 on a 2 GiB image
/// with a 2 MiB slack), and when nearness alone counted, those pairs started streams that
/// decoded megabytes nobody read (6 to 297 such streams in 15 s of `fio --rw=randread`).
#[derive(Default)]
pub(crate) struct Detector {
    /// End of the previous request.
    last_end: AtomicU64,
    /// Weight of the sequential requests in a row (see [`SEQUENTIAL_TRIGGER`]).
    streak: AtomicU32,
}

impl Detector {
    /// Records request `offset..offset + len`; true once the sequential requests in a row
    /// weigh [`SEQUENTIAL_TRIGGER`].
    pub(crate) fn observe(&self, offset: u64, len: u64) -> bool {
        let prev = self
            .last_end
            .swap(offset.saturating_add(len), Ordering::Relaxed);
        let distance = offset.abs_diff(prev);
        let large = len >= LARGE_REQUEST;
        if distance == 0 || (large && distance <= SEQUENTIAL_SLACK) {
            // Capped at the trigger: only reaching it matters (and a VM's handle reading
            // for weeks never wraps the count).
            let weight = if large { LARGE_WEIGHT } else { 1 };
            let streak = (self.streak.load(Ordering::Relaxed) + weight).min(SEQUENTIAL_TRIGGER);
            self.streak.store(streak, Ordering::Relaxed);
            return streak >= SEQUENTIAL_TRIGGER;
        }
        if distance > SEQUENTIAL_SLACK {
            self.streak.store(0, Ordering::Relaxed);
            return false;
        }
        // Small and near: the streak (random or sequential) goes on as it was.
        self.streak.load(Ordering::Relaxed) >= SEQUENTIAL_TRIGGER
    }

    /// True while no request of the handle has counted as sequential since its last jump.
    pub(crate) fn is_random(&self) -> bool {
        self.streak.load(Ordering::Relaxed) == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Image bytes `span`, decoded (or being decoded) into one buffer.
pub(crate) struct Window {
    span: Range<u64>,
    /// The bytes, once decoded: read without a lock (replies are long kernel copies, and the
    /// request threads answer from the same window at once). A buffer of the filesystem's
    /// window pool, back there when the window is dropped.
    data: OnceLock<Recycled>,
    /// Set when the decode ended, well or not.
    done: Mutex<bool>,
    ready: Condvar,
    /// The filesystem's windows (this one counts until dropped).
    budget: Arc<WindowBudget>,
}

impl Window {
    /// Waits for the decode, then hands `f` the bytes `offset..offset + len` (inside the
    /// span). `None` if the decode failed: the caller reads the chunks itself and reports
    /// the damage with its offset.
    pub(crate) fn with_bytes<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Option<R> {
        if self.data.get().is_none() {
            let mut done = lock(&self.done);
            while !*done {
                done = self.ready.wait(done).unwrap_or_else(|e| e.into_inner());
            }
        }
        let at = (offset - self.span.start) as usize;
        self.data.get()?.get(at..at + len).map(f)
    }

    /// The part of `offset..end` this window holds.
    pub(crate) fn clip(&self, offset: u64, end: u64) -> Range<u64> {
        offset.max(self.span.start)..end.min(self.span.end)
    }

    /// Ends the decode: `data` the bytes, `None` when it failed.
    fn finish(&self, data: Option<Recycled>) {
        if let Some(data) = data {
            let _ = self.data.set(data);
        }
        *lock(&self.done) = true;
        self.ready.notify_all();
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let len = self.span.end - self.span.start;
        self.budget.alive.fetch_sub(len, Ordering::Relaxed);
    }
}

/// What the streams of one filesystem share: the bytes of their windows alive, the limit on
/// those, and the buffers of windows no longer needed. Buffers go from stream to stream
/// instead of back to the allocator: under many clients, freed 8 MiB windows were most of the
/// 200-400 MiB of free memory glibc's arenas kept (docs/PERFORMANCE.md, "Mount memory under
/// many clients").
pub(crate) struct WindowBudget {
    alive: AtomicU64,
    max_bytes: u64,
    buffers: Arc<BufferPool>,
}

impl WindowBudget {
    /// Windows of about `window_bytes`, at most `max_bytes` of them alive; spare buffers are
    /// kept for as many windows as that allows.
    pub(crate) fn new(max_bytes: u64, window_bytes: u64) -> Arc<Self> {
        let per_window = window_bytes.clamp(1, MAX_WINDOW);
        let spares = (max_bytes / per_window).clamp(1, 64) as usize;
        Arc::new(WindowBudget {
            alive: AtomicU64::new(0),
            max_bytes,
            buffers: BufferPool::new(spares),
        })
    }

    /// Frees the spare buffers (an idle mount hands their memory back); how many.
    pub(crate) fn free_spares(&self) -> usize {
        self.buffers.drain()
    }

    #[cfg(test)]
    fn spares(&self) -> usize {
        self.buffers.spares()
    }
}

#[derive(Default)]
struct Inner {
    windows: VecDeque<Arc<Window>>,
    /// The stream is planned from here (where it started or jumped to, or the end of the
    /// last window dropped behind the reader) ...
    base: u64,
    /// ... up to here, where the next window starts (an extent boundary).
    next: u64,
    /// Where the stream started (its reader's bytes from here on were sequential).
    origin: u64,
}

/// The windows of one file handle.
#[derive(Default)]
pub(crate) struct Stream {
    inner: Mutex<Inner>,
}

impl Stream {
    /// For a sequential request `offset..offset + len`: keeps windows of about `window_bytes`
    /// (at most [`MAX_WINDOW`]) decoding up to `window_bytes * (MAX_WINDOWS - 1)` ahead
    /// (while the filesystem's windows stay within `budget`) and returns the windows that
    /// together hold the whole request, in order (empty if they do not).
    ///
    /// A new stream ramps up, as the kernel's read-ahead does: it decodes about twice what it
    /// has read so far ahead of the reader (see [`FIRST_AHEAD`]). Two random reads that
    /// happen to fall close together look like a stream, and decoding the full depth ahead
    /// of each (48 MiB at the defaults) took the mount's window memory and CPU for bytes
    /// nobody read; now such a false stream costs one window.
    pub(crate) fn windows_for(
        &self,
        reader: &Arc<ImageReader>,
        offset: u64,
        len: u64,
        window_bytes: u64,
        budget: &Arc<WindowBudget>,
    ) -> Vec<Arc<Window>> {
        let window_bytes = window_bytes.clamp(1, MAX_WINDOW);
        let mut inner = lock(&self.inner);
        let behind = offset.saturating_sub(window_bytes);
        // Windows the reader has left behind (by a window's length: the kernel's requests
        // can arrive a little out of order) give their buffer back.
        while inner.windows.front().is_some_and(|w| w.span.end <= behind) {
            if let Some(w) = inner.windows.pop_front() {
                // A jump back before it starts the stream over. (Its buffer goes back to the
                // pool once nobody reads the window any more.)
                inner.base = inner.base.max(w.span.end);
            }
        }
        if !(inner.base..inner.next).contains(&offset) {
            // A new stream, or the reader jumped: plan from its request.
            tracing::debug!("stream starts at {offset} ({len} bytes asked)");
            inner.windows.clear();
            inner.next = reader.extent_start(offset);
            inner.base = inner.next;
            // From the request, not its extent's start: that may be the start of a long
            // zero run far before it, which would count as read.
            inner.origin = offset;
        }
        // The ramp: decode about twice what the stream has read ahead of the reader, up to
        // the full depth (windows keep their size: windows of many sizes fragmented the
        // heap, measured as a higher peak RSS of a sequential read).
        let proven = (offset + len).saturating_sub(inner.origin);
        let ahead = (window_bytes * (MAX_WINDOWS as u64 - 1)).min(proven.max(FIRST_AHEAD) * 2);
        let horizon = (offset + len).saturating_add(ahead);
        while inner.next < horizon.min(reader.size()) && inner.windows.len() < MAX_WINDOWS {
            // (A long zero run is skipped: its requests are zeros, nothing to decode.)
            let Some(span) = next_span(reader, inner.next, window_bytes) else {
                break;
            };
            let bytes = span.end - span.start;
            if budget.alive.fetch_add(bytes, Ordering::Relaxed) + bytes > budget.max_bytes {
                budget.alive.fetch_sub(bytes, Ordering::Relaxed);
                break; // other streams hold the memory: the chunk path serves this one
            }
            let window = Arc::new(Window {
                span: span.clone(),
                data: OnceLock::new(),
                done: Mutex::new(false),
                ready: Condvar::new(),
                budget: budget.clone(),
            });
            inner.next = span.end;
            // One line per window decoded (`IMGVAULT_LOG=imgvault::fuse::stream=debug`):
            // docs/PERFORMANCE.md counts the bytes decoded ahead of random readers with it.
            tracing::debug!(
                "window of {bytes} bytes at {} for a read at {offset}",
                span.start
            );
            inner.windows.push_back(window.clone());
            let mut buf = budget.buffers.take();
            if buf.capacity() < bytes as usize {
                // Room for slightly larger spans later, so a reused buffer never grows
                // (growing copies it).
                *buf = Vec::with_capacity(bytes as usize + (bytes as usize >> 4));
            }
            let reader = reader.clone();
            let job = window.clone();
            // A thread of its own waits for the window's stored values (on a cold store, the
            // disk) while rayon's threads decode the windows before it.
            let spawned = std::thread::Builder::new()
                .name("imgvault-window".into())
                .spawn(move || {
                    // A failure is logged by the reader; the chunk path reports it to the caller.
                    let decoded = reader.decode_span(job.span.clone(), &mut buf).is_ok();
                    job.finish(decoded.then_some(buf));
                });
            if spawned.is_err() {
                window.finish(None); // the chunk path serves it
            }
        }
        let end = offset + len;
        let mut held = Vec::new();
        let mut at = offset;
        for w in &inner.windows {
            if w.span.end <= at {
                continue;
            }
            if w.span.start > at {
                break; // a gap (a long zero run): not held
            }
            held.push(w.clone());
            at = w.span.end;
            if at >= end {
                return held;
            }
        }
        Vec::new()
    }

    /// Drops the windows (an idle mount gives their memory back; the reader of a file left
    /// open, a server that booted from the image, may not read on for days). The next
    /// request starts the stream over. Returns how many windows were dropped.
    pub(crate) fn drop_windows(&self) -> usize {
        let mut inner = lock(&self.inner);
        let dropped = inner.windows.len();
        inner.windows.clear();
        (inner.base, inner.next) = (0, 0);
        dropped
    }
}

/// The next window's span from extent boundary `from`: whole extents, about `target` bytes,
/// skipping a long zero run at its start and ending before one.
fn next_span(reader: &ImageReader, from: u64, target: u64) -> Option<Range<u64>> {
    let extents = reader.extents();
    let mut idx = reader.extent_index(from);
    while extents
        .get(idx)
        .is_some_and(|e| e.chunk.is_none() && e.len >= LONG_ZEROS)
    {
        idx += 1;
    }
    let start = extents.get(idx)?.offset;
    let mut end = start;
    while let Some(e) = extents.get(idx) {
        if end > start && (end - start >= target || (e.chunk.is_none() && e.len >= LONG_ZEROS)) {
            break;
        }
        end = e.end();
        idx += 1;
    }
    Some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::progress::NoProgress;
    use crate::read::ChunkCache;
    use crate::store::{InitOptions, Store};

    impl Stream {
        /// Bytes of the windows planned ahead of `offset`, and the largest window.
        fn planned_after(&self, offset: u64) -> (u64, u64) {
            let inner = lock(&self.inner);
            let ahead = inner.next.saturating_sub(offset);
            let largest = inner
                .windows
                .iter()
                .map(|w| w.span.end - w.span.start)
                .max()
                .unwrap_or(0);
            (ahead, largest)
        }
    }

    #[test]
    fn random_small_reads_near_each_other_are_not_a_stream() {
        const KIB: u64 = 1 << 10;
        let d = Detector::default();
        // 4 KiB reads that happen to land within a few hundred KiB of each other.
        let near = [
            900_000 * KIB,
            900_300 * KIB,
            900_100 * KIB,
            901_000 * KIB,
            900_500 * KIB,
        ];
        for offset in near {
            assert!(!d.observe(offset, 4 * KIB), "4 KiB read at {offset}");
            assert!(d.is_random());
        }
        // A far jump, then the same: still random.
        assert!(!d.observe(5 * KIB, 4 * KIB));
        assert!(!d.observe(300 * KIB, 4 * KIB));
        assert!(d.is_random());
    }

    #[test]
    fn adjacent_small_reads_and_out_of_order_read_ahead_are_a_stream() {
        const KIB: u64 = 1 << 10;
        // O_DIRECT `dd bs=4k`: every request where the last one ended; a stream once it
        // has read 64 KiB so (a few adjacent 4 KiB requests are not enough).
        let d = Detector::default();
        let hits: Vec<bool> = (0..20).map(|i| d.observe(i * 4 * KIB, 4 * KIB)).collect();
        assert_eq!(hits.iter().position(|&h| h), Some(15), "{hits:?}");
        assert!(hits[15..].iter().all(|&h| h));
        assert!(!d.is_random());
        // Three adjacent 4 KiB requests after a jump: no stream.
        let d = Detector::default();
        assert!(!d.observe(900 << 20, 4 * KIB));
        assert!(!d.observe((900 << 20) + 4 * KIB, 4 * KIB));
        assert!(!d.observe((900 << 20) + 8 * KIB, 4 * KIB));
        // The kernel's read-ahead: 1 MiB requests, the second and third swapped.
        let d = Detector::default();
        assert!(!d.observe(64 << 20, 1 << 20));
        assert!(!d.observe(66 << 20, 1 << 20)); // one ahead of its turn: one in a row
        assert!(d.observe(65 << 20, 1 << 20), "the late one: two in a row");
        // A small request in between (around pages already cached) keeps the stream.
        assert!(d.observe(67 << 20, 8 * KIB));
        assert!(d.observe((67 << 20) + 64 * KIB, 960 * KIB));
        assert!(!d.is_random());
        // A jump far away ends it.
        assert!(!d.observe(1 << 30, 1 << 20));
        assert!(d.is_random());
    }

    #[test]
    fn a_new_stream_ramps_up_its_decode_ahead() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s"), &InitOptions::default()).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..64 * MIB)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let file = dir.path().join("d.raw");
        std::fs::write(&file, &data).unwrap();
        let opts = crate::ingest::IngestOptions::new("d", "admin");
        crate::ingest::import_path(&store, &file, &opts, &NoProgress).unwrap();
        let store = Arc::new(store);
        let image = Catalog::new(&store)
            .resolve_readable("admin", "d", "read")
            .unwrap();
        let cache = Arc::new(ChunkCache::new(0));
        let reader = Arc::new(ImageReader::open(store, image, cache).unwrap());
        let window = 8 * MIB;
        let (stream, budget) = (Stream::default(), WindowBudget::new(1 << 30, window));
        let read = |offset: u64| {
            let held = stream.windows_for(&reader, offset, 128 << 10, window, &budget);
            if held.is_empty() {
                let inner = lock(&stream.inner);
                let spans: Vec<_> = inner.windows.iter().map(|w| w.span.clone()).collect();
                panic!(
                    "request at {offset} not held: base {} next {} origin {} windows {spans:?}",
                    inner.base, inner.next, inner.origin
                );
            }
            for w in &held {
                let part = w.clip(offset, offset + (128 << 10));
                let at = part.start as usize;
                let same = w.with_bytes(part.start, (part.end - part.start) as usize, |b| {
                    b == &data[at..at + b.len()]
                });
                assert_eq!(same, Some(true), "window bytes at {offset}");
            }
        };
        // The first request of a stream: one window.
        read(0);
        let (ahead, _) = stream.planned_after(128 << 10);
        assert!(
            ahead <= window + (256 << 10),
            "decoding {ahead} ahead of a new stream"
        );
        // After 24 MiB read in order: full windows, the full depth.
        let mut offset = 0;
        while offset < 24 * MIB {
            read(offset);
            offset += 128 << 10;
        }
        let (ahead, largest) = stream.planned_after(offset);
        assert!(
            largest >= window - (256 << 10),
            "window after 24 MiB: {largest}"
        );
        assert!(ahead >= 4 * window, "only {ahead} ahead after 24 MiB");

        // A stream's buffers go to the next stream, not back to the allocator; an idle
        // mount frees them.
        drop(stream);
        // Once every window is dropped (their decodes finished) the count stops changing.
        let settled = || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let before = budget.spares();
                std::thread::sleep(std::time::Duration::from_millis(50));
                let idle = budget.alive.load(Ordering::Relaxed) == 0;
                if (idle && budget.spares() == before) || std::time::Instant::now() > deadline {
                    return budget.spares();
                }
            }
        };
        let spares = settled();
        assert!(
            spares >= 5,
            "a closed stream's windows left {spares} spare buffers"
        );
        let next = Stream::default();
        let held = next.windows_for(&reader, 0, 128 << 10, window, &budget);
        assert_eq!(held.len(), 1);
        assert!(
            budget.spares() < spares,
            "the next stream's window took no spare buffer"
        );
        drop((held, next));
        settled();
        budget.free_spares();
        assert_eq!(budget.spares(), 0);
    }
}
