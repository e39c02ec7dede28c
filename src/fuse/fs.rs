//! The filesystem's state and operations: every operation is a small `Result`-returning
//! method here; the fuser `Filesystem` impl (`ops.rs`) only turns results into replies,
//! mapping errors to errnos in one place ([`errno`], through [`Error::errno`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo, OpenAccMode, OpenFlags, ReplyDirectory};

use super::layout::{self, View};
use super::stream::{Detector, Stream, WindowBudget};
use super::MountOptions;
use crate::catalog::{Access, Catalog, ImageRecord};
use crate::error::{Error, Result};
use crate::read::{BufferPool, ChunkCache, Decoded, ImageReader, Recycled};
use crate::store::pins::{self, Pin};
use crate::store::{LiveStore, Store};

/// Attribute and entry lifetime in the kernel: short, so that images imported, deleted or
/// shared by the writer show up (or vanish) within about a second.
pub(super) const TTL: Duration = Duration::from_secs(1);

/// The catalog is re-read (RocksDB secondary catch-up) at most this often.
const REFRESH_EVERY: Duration = Duration::from_millis(300);

/// Memory for the decoded windows of sequential readers, over all open files; a stream
/// that finds it taken reads through the chunk cache.
const MAX_WINDOW_BYTES: u64 = 128 << 20;

/// Chunks waiting to be stored into the page cache; more are dropped (an optimisation only).
pub(crate) const PAGE_FEED_QUEUE: usize = 64;

/// Page size of the kernel's page cache.
const PAGE: u64 = 4096;

/// Spare decode buffers: enough for every chunk queued for the feeder, plus those in use.
const SPARE_BUFFERS: usize = PAGE_FEED_QUEUE + 8;

/// A decoded chunk to store into the kernel's page cache (FUSE_NOTIFY_STORE): the part
/// `range` of `data`, which holds the image's bytes from `chunk_offset`.
pub(crate) struct PageFeed {
    ino: u64,
    chunk_offset: u64,
    range: std::ops::Range<usize>,
    data: ChunkBytes,
}

/// A decoded chunk a random read used: shared with the chunk cache, or a pool buffer (back
/// in the pool once the feeder has stored it).
enum ChunkBytes {
    Cached(Decoded),
    Pooled(Recycled),
}

impl std::ops::Deref for ChunkBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ChunkBytes::Cached(d) => d,
            ChunkBytes::Pooled(b) => b,
        }
    }
}

/// Stores decoded chunks into the page cache, on its own thread: a store waits for page
/// locks that pending reads hold, and only the request threads can complete those reads, so
/// they must never wait here. Ends when the filesystem (the sender) is dropped.
pub(crate) fn spawn_page_feeder(
    notifier: fuser::Notifier,
    rx: crossbeam_channel::Receiver<PageFeed>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("imgvault-pages".into())
        .spawn(move || {
            for job in rx {
                let offset = job.chunk_offset + job.range.start as u64;
                if let Some(bytes) = job.data.get(job.range) {
                    // ENOENT (inode evicted) and ENODEV (unmounted) only cost the optimisation.
                    let _ = notifier.store(INodeNo(job.ino), offset, bytes);
                }
            }
        })
        .map(|_| ())
}

thread_local! {
    /// Per-thread read buffer, reused across requests.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How often an idle mount catches up with the store, so that open images move to the
/// latest snapshot (see [`rebase_open_images`]) without waiting for a request.
const REBASE_EVERY: Duration = Duration::from_secs(2);

/// Moves the readers of open images to `snapshot` where it holds their chunks: the image
/// is still there, or this mount pinned its chunks (gc keeps pinned chunks of a deleted
/// image). A reader left on an old snapshot keeps it alive, and with it every table and
/// blob file it opened: space gc freed would stay in use for as long as a VM keeps the
/// image open. An image deleted without a pin (the pin could not be written) stays on its
/// snapshot until closed.
fn rebase_open_images(open: &Mutex<HashMap<u64, OpenImage>>, snapshot: &Arc<Store>) {
    let catalog = Catalog::new(snapshot);
    for o in lock(open).values() {
        if Arc::ptr_eq(&o.reader.store(), snapshot) {
            continue;
        }
        if o._pin.is_some() || matches!(catalog.get(&o.record.id), Ok(Some(_))) {
            o.reader.rebase(snapshot.clone());
        }
    }
}

/// A thread that catches up with the store every [`REBASE_EVERY`] and rebases the open
/// images (requests do it too, but an idle mount gets none); it ends with the filesystem.
/// It catches up with nothing open too: the mount's own snapshot holds the table and blob
/// files it last read, and gc's space would stay in use until the next request. (Cheap when
/// nothing changed: `refresh` compares the store's stamp first.)
///
/// When no request came in for a whole period it also gives memory back once (see
/// [`Idle::release`]). Requests set `served`, and this thread clears it.
fn spawn_rebaser(
    store: Weak<LiveStore>,
    open: Weak<Mutex<HashMap<u64, OpenImage>>>,
    served: Arc<AtomicBool>,
    idle: Idle,
) {
    let mut released = false;
    let run = move || loop {
        std::thread::sleep(REBASE_EVERY);
        let (Some(store), Some(open)) = (store.upgrade(), open.upgrade()) else {
            return;
        };
        match store.refresh() {
            Ok(_) => rebase_open_images(&open, &store.get()),
            Err(e) => tracing::warn!("catching up with the store's writer: {e}"),
        }
        if served.swap(false, Ordering::Relaxed) {
            released = false;
        } else if !released {
            idle.release();
            released = true;
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("imgvault-rebase".into())
        .spawn(run)
    {
        tracing::warn!("cannot start the snapshot thread (gc's space returns on close): {e}");
    }
}

/// What an idle mount gives back.
struct Idle {
    handles: Weak<RwLock<HashMap<u64, Arc<Handle>>>>,
    windows: Weak<WindowBudget>,
    buffers: Weak<BufferPool>,
}

impl Idle {
    /// The decoded windows of every open file (a file left open by a server that booted
    /// from it holds up to the whole window budget otherwise), the spare window and decode
    /// buffers, then the heap's free memory (see [`release_free_heap`]).
    fn release(&self) {
        let dropped = self.handles.upgrade().map_or(0, |handles| {
            let handles: Vec<Arc<Handle>> = (handles.read())
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            handles.iter().map(|h| h.stream.drop_windows()).sum()
        });
        let windows = self.windows.upgrade().map_or(0, |w| w.free_spares());
        let buffers = self.buffers.upgrade().map_or(0, |b| b.drain());
        tracing::debug!(
            "idle: dropped {dropped} windows of open files; freed {windows} window buffers \
             and {buffers} decode buffers"
        );
        release_free_heap();
    }
}

/// Free heap worth handing back to the kernel when the mount goes idle.
const RELEASE_AT_LEAST: usize = 16 << 20;

/// Hands the free memory in glibc's heaps back to the kernel (`malloc_trim`). Under many
/// clients the mount's heaps hold 200-400 MiB freed by decode windows and chunk buffers,
/// which glibc keeps (docs/PERFORMANCE.md, "Mount memory under many clients"); trimming
/// walks every heap under its lock, so it is done once a mount goes idle, never while it
/// serves.
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 and malloc_trim only read and adjust the allocator's own state.
        let free = unsafe { libc::mallinfo2() }.fordblks;
        if free >= RELEASE_AT_LEAST {
            unsafe { libc::malloc_trim(0) };
            let left = unsafe { libc::mallinfo2() }.fordblks;
            tracing::debug!(
                "idle: gave back free heap ({} MiB free before, {} MiB after)",
                free >> 20,
                left >> 20
            );
        }
    }
}

/// The errno a failed request returns: the one place FUSE maps errors.
pub(super) fn errno(op: &str, e: &Error) -> Errno {
    let n = e.errno();
    // EIO is damage or a failing disk: always worth the log (a corrupt chunk's message names
    // the image and byte offset). Other errnos are the caller's business.
    if n == libc::EIO {
        tracing::error!("{op}: {e}");
    } else {
        tracing::debug!("{op}: {e}");
    }
    Errno::from_i32(n)
}

/// An error that is only an errno (no library condition behind it).
fn sys(code: i32, context: impl Into<String>) -> Error {
    Error::Io {
        context: context.into(),
        source: std::io::Error::from_raw_os_error(code),
    }
}

pub(super) fn read_only(what: &str) -> Error {
    sys(
        libc::EROFS,
        format!("{what}: the imgvault mount is read-only"),
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn system_time(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// An image opened by at least one file handle: its reader (shared by the handles) and the
/// pin that keeps gc from reclaiming its chunks.
struct OpenImage {
    reader: Arc<ImageReader>,
    record: Arc<ImageRecord>,
    handles: usize,
    /// None where the pin could not be written (a full or read-only store directory).
    _pin: Option<Pin>,
}

/// One open file.
struct Handle {
    ino: u64,
    reader: Arc<ImageReader>,
    /// Sequential or random, from its requests.
    pattern: Detector,
    /// Decoded windows ahead of a sequential reader.
    stream: Stream,
    /// Opened with O_DIRECT: the page cache is not used, nothing to feed it.
    direct: bool,
}

/// A directory listing taken at opendir, so readdir offsets stay stable.
struct Listing {
    entries: Vec<(u64, FileType, String)>,
}

/// The imgvault filesystem.
pub struct ImgvaultFs {
    store: Arc<LiveStore>,
    tenant: String,
    cache: Arc<ChunkCache>,
    prefetch_bytes: u64,
    view: RwLock<Arc<View>>,
    /// When the tree was last checked, and the snapshot it was built from (not kept alive
    /// by this: an old snapshot holds every file it opened).
    refreshed: Mutex<(Instant, Weak<Store>)>,
    /// Open images (shared with the rebasing thread, see [`spawn_rebaser`]).
    open: Arc<Mutex<HashMap<u64, OpenImage>>>,
    handles: Arc<RwLock<HashMap<u64, Arc<Handle>>>>,
    listings: Mutex<HashMap<u64, Arc<Listing>>>,
    next_fh: AtomicU64,
    /// Sequential readers' windows: their bytes alive, and spare buffers.
    windows: Arc<WindowBudget>,
    /// Set by every read, cleared by the rebasing thread: tells it an idle mount.
    served: Arc<AtomicBool>,
    pages: Option<crossbeam_channel::Sender<PageFeed>>,
    /// Decode buffers of random reads, recycled through the feeder.
    buffers: Arc<BufferPool>,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
}

impl ImgvaultFs {
    /// A filesystem over `store` as `opts.tenant` sees it.
    pub fn new(store: LiveStore, opts: &MountOptions) -> Result<Self> {
        Self::with_page_feed(store, opts, None)
    }

    /// Like [`ImgvaultFs::new`]; random reads also send the whole decoded chunks they touch
    /// to `pages` (see [`spawn_page_feeder`]).
    pub(crate) fn with_page_feed(
        store: LiveStore,
        opts: &MountOptions,
        pages: Option<crossbeam_channel::Sender<PageFeed>>,
    ) -> Result<Self> {
        let snapshot = store.get();
        let view = View::build(&Catalog::new(&snapshot), &opts.tenant)?;
        let store = Arc::new(store);
        let open = Arc::new(Mutex::new(HashMap::new()));
        let served = Arc::new(AtomicBool::new(false));
        let windows = WindowBudget::new(MAX_WINDOW_BYTES, opts.prefetch_bytes);
        let buffers = BufferPool::new(SPARE_BUFFERS);
        let handles = Arc::new(RwLock::new(HashMap::new()));
        spawn_rebaser(
            Arc::downgrade(&store),
            Arc::downgrade(&open),
            served.clone(),
            Idle {
                handles: Arc::downgrade(&handles),
                windows: Arc::downgrade(&windows),
                buffers: Arc::downgrade(&buffers),
            },
        );
        Ok(ImgvaultFs {
            cache: Arc::new(ChunkCache::new(opts.cache_bytes)),
            store,
            tenant: opts.tenant.clone(),
            prefetch_bytes: opts.prefetch_bytes,
            view: RwLock::new(Arc::new(view)),
            refreshed: Mutex::new((Instant::now(), Arc::downgrade(&snapshot))),
            open,
            handles,
            listings: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            windows,
            served,
            pages,
            buffers,
            // SAFETY: getuid/getgid have no preconditions.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            mounted_at: SystemTime::now(),
        })
    }

    // ---- catalog view ------------------------------------------------------------------

    fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Catches up with the writer and rebuilds the tree, at most every [`REFRESH_EVERY`];
    /// a request arriving while another thread refreshes uses the current tree.
    fn refresh(&self) {
        let mut last = match self.refreshed.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if last.0.elapsed() < REFRESH_EVERY {
            return;
        }
        last.0 = Instant::now();
        if let Err(e) = self.store.refresh() {
            tracing::warn!("catching up with the store's writer: {e}");
        }
        let snapshot = self.store.get();
        if last.1.upgrade().is_some_and(|s| Arc::ptr_eq(&s, &snapshot)) {
            return; // nothing committed since the tree was built
        }
        rebase_open_images(&self.open, &snapshot);
        match View::build(&Catalog::new(&snapshot), &self.tenant) {
            Ok(v) => {
                *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
                last.1 = Arc::downgrade(&snapshot);
            }
            Err(e) => tracing::warn!("re-reading the catalog: {e}"),
        }
    }

    /// The record of an image inode: from the tree, or from the open files (an image deleted
    /// while open keeps its attributes until closed).
    fn record(&self, view: &View, ino: u64) -> Option<Arc<ImageRecord>> {
        view.images
            .get(&ino)
            .cloned()
            .or_else(|| lock(&self.open).get(&ino).map(|o| o.record.clone()))
    }

    // ---- attributes --------------------------------------------------------------------

    fn dir_attr(&self, view: &View, ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2 + view.subdirs(ino) as u32,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn image_attr(&self, ino: u64, rec: &ImageRecord) -> FileAttr {
        let t = system_time(rec.created);
        FileAttr {
            ino: INodeNo(ino),
            size: rec.virtual_size,
            // What `du` and `qemu-img info` call the disk size: the non-zero data.
            blocks: rec.nonzero_bytes.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::RegularFile,
            perm: 0o444,
            // Under its name and under by-id.
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    fn attr(&self, view: &View, ino: u64) -> Result<FileAttr> {
        if view.dirs.contains_key(&ino) {
            return Ok(self.dir_attr(view, ino));
        }
        match self.record(view, ino) {
            Some(rec) => Ok(self.image_attr(ino, &rec)),
            None => Err(sys(libc::ENOENT, format!("inode {ino:#x} is gone"))),
        }
    }

    // ---- operations --------------------------------------------------------------------

    pub(super) fn do_lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr> {
        self.refresh();
        let view = self.view();
        if layout::is_image_ino(parent) {
            return Err(sys(libc::ENOTDIR, "lookup in an image file"));
        }
        let not_found = || Error::ImageNotFound {
            image: name.to_string_lossy().into_owned(),
            tenant: self.tenant.clone(),
        };
        let name = name.to_str().ok_or_else(not_found)?;
        let ino = view.lookup(parent, name).ok_or_else(not_found)?;
        self.attr(&view, ino)
    }

    pub(super) fn do_getattr(&self, ino: u64) -> Result<FileAttr> {
        self.refresh();
        self.attr(&self.view(), ino)
    }

    pub(super) fn do_open(&self, ino: u64, flags: OpenFlags) -> Result<u64> {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return Err(read_only("open for writing"));
        }
        if !layout::is_image_ino(ino) {
            return Err(sys(libc::EISDIR, "open a directory as a file"));
        }
        let reader = self.acquire(ino)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(Handle {
            ino,
            reader,
            pattern: Detector::default(),
            stream: Stream::default(),
            direct: flags.0 & libc::O_DIRECT != 0,
        });
        self.handles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, handle);
        Ok(fh)
    }

    /// The shared reader of image `ino`, opening it (and pinning its chunks) on first use.
    fn acquire(&self, ino: u64) -> Result<Arc<ImageReader>> {
        // Access is checked at every open, not only the first: a share withdrawn while
        // another handle keeps the image open must stop new opens (by path, or through
        // /proc/self/fd) as it would if the image were closed. (Before the lock below:
        // a refresh rebases the open images under it.)
        self.refresh();
        // Held across the first open so that two threads never write the same pin twice.
        let mut open = lock(&self.open);
        if let Some(o) = open.get_mut(&ino) {
            if !self.view().images.contains_key(&ino) {
                return Err(Error::ImageNotFound {
                    image: o.record.id.to_hex(),
                    tenant: self.tenant.clone(),
                });
            }
            o.handles += 1;
            return Ok(o.reader.clone());
        }
        let rec = self.view().images.get(&ino).cloned().ok_or_else(|| {
            sys(
                libc::ENOENT,
                format!("inode {ino:#x}: no such image (deleted?)"),
            )
        })?;
        let gone = || Error::ImageNotFound {
            image: rec.id.to_hex(),
            tenant: self.tenant.clone(),
        };
        let snapshot = self.store.get();
        let reader = match ImageReader::open(snapshot.clone(), (*rec).clone(), self.cache.clone()) {
            Ok(r) => r,
            Err(e) => {
                // Deleted since the tree was built: its extents are gone too.
                self.store.refresh_now()?;
                if Catalog::new(&self.store.get()).get(&rec.id)?.is_none() {
                    return Err(gone());
                }
                return Err(e);
            }
        };
        // Pin first, then check the image still exists: a delete we do not see yet happens
        // after the pin, so any gc that could free these chunks reads it.
        // Best effort, as for export: where the pin cannot be written (the store's disk
        // full, its directory read-only) the image is served unprotected against a gc that
        // follows a delete, with a warning; refusing would make every open fail.
        let pin = match pins::write(
            snapshot.path(),
            &rec.id,
            reader.extents().iter().filter_map(|e| e.chunk),
        ) {
            Ok(pin) => Some(pin),
            Err(e) => {
                tracing::warn!(
                    "cannot pin image {}/{} against gc (served unprotected): {e}",
                    rec.owner,
                    rec.name
                );
                None
            }
        };
        self.store.refresh_now()?;
        let latest = self.store.get();
        let catalog = Catalog::new(&latest);
        let Some(current) = catalog.get(&rec.id)? else {
            return Err(gone());
        };
        match catalog.access(&self.tenant, &current)? {
            Some(Access::Owner | Access::Reader) => {}
            _ => return Err(gone()),
        }
        let reader = Arc::new(reader);
        open.insert(
            ino,
            OpenImage {
                reader: reader.clone(),
                record: Arc::new(current),
                handles: 1,
                _pin: pin,
            },
        );
        Ok(reader)
    }

    pub(super) fn do_release(&self, fh: u64) {
        let handle = self
            .handles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
        let Some(handle) = handle else { return };
        let mut open = lock(&self.open);
        if let Some(o) = open.get_mut(&handle.ino) {
            o.handles = o.handles.saturating_sub(1);
            if o.handles == 0 {
                // Drops the reader and removes the pin.
                open.remove(&handle.ino);
            }
        }
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or_else(|| sys(libc::EBADF, format!("file handle {fh} is not open")))
    }

    /// Hands the bytes to `reply`: from a sequential reader's decoded window when one holds
    /// them, else read into the thread's buffer through the chunk cache.
    pub(super) fn do_read(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        reply: impl FnOnce(&[u8]),
    ) -> Result<()> {
        // Read before written: while set, the flag's cache line stays shared between the
        // request threads instead of bouncing at every read.
        if !self.served.load(Ordering::Relaxed) {
            self.served.store(true, Ordering::Relaxed);
        }
        let h = self.handle(fh)?;
        let len = u64::from(size).min(h.reader.size().saturating_sub(offset)) as usize;
        if len == 0 {
            reply(&[]);
            return Ok(());
        }
        let mut reply = Some(reply);
        if self.is_sequential(&h, offset, len as u64)
            && self.answer_from_windows(&h, offset, len, &mut reply)
        {
            return Ok(());
        }
        let reply = reply.take().ok_or(Error::Interrupted)?;
        if let Some(pages) = self.pages.as_ref().filter(|_| self.feeds_pages(&h)) {
            return self.read_feeding_pages(&h, offset, len, pages, reply);
        }
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            // The reader's snapshot keeps every file open, so a failure here is damage
            // (already logged with image and offset), not a race.
            let n = h.reader.read_at(offset, &mut buf[..len])?;
            reply(&buf[..n]);
            Ok(())
        })
    }

    /// True for a random (not sequential) read of a buffered handle: the page cache then
    /// gets the whole chunks it touches (see [`Self::read_feeding_pages`]).
    fn feeds_pages(&self, h: &Handle) -> bool {
        !h.direct && h.pattern.is_random()
    }

    /// A random buffered read: each chunk it touches is decoded (into a recycled buffer,
    /// unless the chunk cache holds it), the request answered, and the whole chunk handed to
    /// the page feeder, so the kernel's page cache gets all of it and later reads of its other
    /// pages never reach the daemon: a 4 KiB miss costs the decode of a ~64 KiB chunk, and
    /// this keeps all of it instead of one page. The chunk cache is left alone: the page cache
    /// holds these chunks now, and filling the cache would only allocate fresh memory.
    fn read_feeding_pages(
        &self,
        h: &Handle,
        offset: u64,
        len: usize,
        pages: &crossbeam_channel::Sender<PageFeed>,
        reply: impl FnOnce(&[u8]),
    ) -> Result<()> {
        let end = offset + len as u64;
        let extents = h.reader.extents();
        let mut used = Vec::new();
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            let mut idx = h.reader.extent_index(offset);
            while let Some(e) = extents.get(idx).filter(|e| e.offset < end) {
                idx += 1;
                let part = (offset.max(e.offset) - e.offset) as usize
                    ..(end.min(e.end()) - e.offset) as usize;
                if e.chunk.is_none() {
                    let filled = buf.len() + part.len();
                    buf.resize(filled, 0); // zeros: nothing decoded
                    continue;
                }
                let data = match h.reader.cached(e) {
                    Some(d) => ChunkBytes::Cached(d),
                    None => {
                        let mut b = self.buffers.take();
                        h.reader.decode_into(e, &mut b)?;
                        ChunkBytes::Pooled(b)
                    }
                };
                buf.extend_from_slice(&data[part]);
                used.push((e, data));
            }
            reply(&buf);
            Ok::<_, Error>(())
        })?;
        let size = h.reader.size();
        for (e, data) in used {
            // Only whole pages inside the chunk (the kernel leaves a partial page not up to
            // date); the request's own pages are cached by the kernel from the reply.
            let start = e.offset.next_multiple_of(PAGE);
            let stop = if e.end() >= size {
                e.end()
            } else {
                e.end() / PAGE * PAGE
            };
            if stop <= start {
                continue;
            }
            let job = PageFeed {
                ino: h.ino,
                chunk_offset: e.offset,
                range: (start - e.offset) as usize..(stop - e.offset) as usize,
                data,
            };
            if pages.try_send(job).is_err() {
                break; // feeder busy: skip, the reads still work
            }
        }
        Ok(())
    }

    /// Answers a sequential request from its stream's decoded windows (see
    /// [`super::stream`]); false when they do not hold it, `reply` then still unused.
    fn answer_from_windows(
        &self,
        h: &Handle,
        offset: u64,
        len: usize,
        reply: &mut Option<impl FnOnce(&[u8])>,
    ) -> bool {
        let windows = h.stream.windows_for(
            &h.reader,
            offset,
            len as u64,
            self.prefetch_bytes,
            &self.windows,
        );
        if let [window] = windows.as_slice() {
            // The whole request in one window: answered from it, no copy.
            return window
                .with_bytes(offset, len, |bytes| {
                    if let Some(r) = reply.take() {
                        r(bytes);
                    }
                })
                .is_some();
        }
        if windows.is_empty() {
            return false;
        }
        // Straddling two windows: copied together (decoding it again would cost more).
        let end = offset + len as u64;
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            for w in &windows {
                let part = w.clip(offset, end);
                let copied = w.with_bytes(part.start, (part.end - part.start) as usize, |b| {
                    buf.extend_from_slice(b)
                });
                if copied.is_none() {
                    return false;
                }
            }
            if let Some(r) = reply.take() {
                r(&buf[..len]);
            }
            true
        })
    }

    /// True when the request continues a sequential reader's (see [`Detector`]) and
    /// decode-ahead is on.
    fn is_sequential(&self, h: &Handle, offset: u64, len: u64) -> bool {
        self.prefetch_bytes != 0 && h.pattern.observe(offset, len)
    }

    pub(super) fn do_lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let h = self.handle(fh)?;
        let size = h.reader.size();
        let off = u64::try_from(offset).map_err(|_| sys(libc::EINVAL, "negative offset"))?;
        let pos = match whence {
            libc::SEEK_SET => off,
            libc::SEEK_END => size.saturating_add(off),
            libc::SEEK_DATA if off >= size => {
                return Err(sys(libc::ENXIO, "SEEK_DATA past the end"))
            }
            libc::SEEK_DATA => h
                .reader
                .next_data(off)
                .ok_or_else(|| sys(libc::ENXIO, "no data after the offset"))?,
            libc::SEEK_HOLE if off >= size => {
                return Err(sys(libc::ENXIO, "SEEK_HOLE past the end"))
            }
            libc::SEEK_HOLE => h.reader.next_hole(off),
            _ => return Err(sys(libc::EINVAL, format!("lseek whence {whence}"))),
        };
        i64::try_from(pos).map_err(|_| sys(libc::EOVERFLOW, "offset"))
    }

    pub(super) fn do_opendir(&self, ino: u64) -> Result<u64> {
        self.refresh();
        let view = self.view();
        let Some(dir) = view.dirs.get(&ino) else {
            return Err(if view.images.contains_key(&ino) {
                sys(libc::ENOTDIR, "opendir on an image file")
            } else {
                sys(libc::ENOENT, format!("directory inode {ino:#x} is gone"))
            });
        };
        let mut entries = vec![
            (ino, FileType::Directory, ".".to_string()),
            (dir.parent, FileType::Directory, "..".to_string()),
        ];
        for (name, child) in &dir.children {
            let kind = if layout::is_image_ino(*child) {
                FileType::RegularFile
            } else {
                FileType::Directory
            };
            entries.push((*child, kind, name.clone()));
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.listings).insert(fh, Arc::new(Listing { entries }));
        Ok(fh)
    }

    pub(super) fn do_readdir(
        &self,
        fh: u64,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> Result<()> {
        let listing = lock(&self.listings)
            .get(&fh)
            .cloned()
            .ok_or_else(|| sys(libc::EBADF, format!("directory handle {fh} is not open")))?;
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in listing.entries.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    fn xattrs(rec: &ImageRecord) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("user.imgvault.id", rec.id.to_hex()),
            ("user.imgvault.owner", rec.owner.clone()),
            ("user.imgvault.visibility", rec.visibility.to_string()),
        ];
        let os = rec
            .properties
            .os_version
            .clone()
            .or_else(|| rec.properties.os_type.clone());
        if let Some(os) = os {
            v.push(("user.imgvault.os", os));
        }
        v.push(("user.imgvault.checksum", rec.checksum.clone()));
        v
    }

    /// The value (or the NUL-separated name list when `name` is `None`) of an inode's
    /// extended attributes.
    pub(super) fn do_xattr(&self, ino: u64, name: Option<&OsStr>) -> Result<Vec<u8>> {
        let view = self.view();
        let attrs = match self.record(&view, ino) {
            Some(rec) => Self::xattrs(&rec),
            None if view.dirs.contains_key(&ino) => Vec::new(),
            None => return Err(sys(libc::ENOENT, format!("inode {ino:#x} is gone"))),
        };
        match name {
            None => Ok(attrs
                .iter()
                .flat_map(|(k, _)| k.bytes().chain(std::iter::once(0)))
                .collect()),
            Some(name) => attrs
                .into_iter()
                .find(|(k, _)| OsStr::new(k) == name)
                .map(|(_, v)| v.into_bytes())
                .ok_or_else(|| sys(libc::ENODATA, format!("no attribute {name:?}"))),
        }
    }

    pub(super) fn do_releasedir(&self, fh: u64) {
        lock(&self.listings).remove(&fh);
    }

    /// Any access but writing to an entry that exists.
    pub(super) fn do_access(&self, ino: u64, write: bool) -> Result<()> {
        if write {
            return Err(read_only("write access"));
        }
        self.attr(&self.view(), ino).map(|_| ())
    }

    pub(super) fn statfs_numbers(&self) -> (u64, u64) {
        let view = self.view();
        let bytes: u64 = view.images.values().map(|r| r.virtual_size).sum();
        (bytes.div_ceil(4096), view.images.len() as u64)
    }
}
