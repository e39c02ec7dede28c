//! The parallel ingest pipeline (see the module docs of `ingest`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver};
use rocksdb::WriteBatch;
use serde::Serialize;

use super::checksum::{Summed, WindowSummer};
use super::source::{ImageSource, SourcePiece, SourceStamp, READ_SIZE};
use super::IngestOptions;
use crate::catalog::{Catalog, ImageId, ImageRecord, Source};
use crate::chunk::{
    Batch, ChunkId, ChunkerParams, Hint, Piece, Segment, Segmenter, SegmenterStats,
};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::store::codec::{encode_chunk, Extent};
use crate::store::{now, Store};

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The new image.
    pub image: ImageRecord,
    /// Format of the source.
    pub format: String,
    /// Bytes read from the source (holes are not read).
    pub bytes_read: u64,
    /// Data chunks in the image (with repeats).
    pub chunks: u64,
    /// Chunks new to the store.
    pub new_chunks: u64,
    /// Their uncompressed bytes.
    pub new_raw_bytes: u64,
    /// Their stored bytes.
    pub new_stored_bytes: u64,
    /// Chunks already in the store (or earlier in this image).
    pub dedup_chunks: u64,
    /// Chunks cut where the store's hints said, without FastCDC (see `store::hints`).
    pub hinted_chunks: u64,
    /// 1 MiB windows of the disk hashed for its checksum (see `ingest::checksum`).
    pub windows_hashed: u64,
    /// Windows whose checksum part the store remembered (not hashed again).
    pub windows_remembered: u64,
    /// Wall time.
    pub seconds: f64,
}

/// A batch after hashing and compression.
struct Done {
    seq: u64,
    extents: Vec<Extent>,
    /// (id, stored value, raw length) of chunks this ingest stores first.
    new_chunks: Vec<(ChunkId, Vec<u8>, u32)>,
    dedup: u64,
    /// Chunk successions to record (see `store::hints`).
    hints: Vec<(ChunkId, Hint)>,
}

pub(super) fn run(
    store: &Store,
    mut source: Box<dyn ImageSource>,
    record_source: Source,
    opts: &IngestOptions,
    params: ChunkerParams,
    level: i32,
    progress: &dyn Progress,
) -> Result<ImportReport> {
    let started = Instant::now();
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let format = source.format().to_string();
    let virtual_size = source.virtual_size();
    // Every file read, the backing files of an overlay too, must be unchanged at the end.
    let stamps: Vec<SourceStamp> = std::iter::once(source.path())
        .chain(source.backing_files().iter().map(|p| p.as_path()))
        .filter_map(SourceStamp::of)
        .collect();
    progress.start(virtual_size);
    let claimed: Mutex<HashSet<ChunkId>> = Mutex::new(HashSet::new());
    let mut written: Vec<ChunkId> = Vec::new();

    let outcome = std::thread::scope(|s| {
        // Small bounds: each slot is a read buffer (2 MiB + headroom) or a batch, and RSS
        // must stay flat.
        let (piece_tx, piece_rx) = bounded::<(SourcePiece, Vec<u8>)>(2);
        // Read buffers come back here from whoever drops them last (the segmenter or a
        // worker), so they are not zero-filled again. Room for every buffer that can be in
        // flight (10-12 with two workers): with room for 4, 64 of a derived image's ~700
        // reads got a fresh, page-faulted buffer. Peak RSS is the same either way.
        let (free_tx, free_rx) = bounded::<Vec<u8>>(16);
        // Bytes are read after this much room, where the segmenter puts a region's tail
        // (so its chunks need no copy).
        let headroom = params.headroom();
        let (work_tx, work_rx) = bounded::<Batch>(threads);
        let (done_tx, done_rx) = bounded::<Result<Done>>(threads);

        let reader = s.spawn(move || -> Result<u64> {
            let mut bytes = 0u64;
            loop {
                let mut buf = free_rx
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(headroom + READ_SIZE));
                let Some(piece) = source.next_piece(&mut buf, headroom)? else {
                    for stamp in &stamps {
                        stamp.check_unchanged()?;
                    }
                    return Ok(bytes);
                };
                if let SourcePiece::Data = piece {
                    bytes += (buf.len() - headroom) as u64;
                }
                if piece_tx.send((piece, buf)).is_err() {
                    return Ok(bytes); // downstream stopped; its error is reported
                }
            }
        });

        // The whole-disk BLAKE3, from the segments in stream order and the buffers their
        // chunks point into (see `checksum`): only windows the store has not seen are hashed.
        let (window_tx, window_rx) = bounded::<(Arc<Vec<u8>>, Vec<Segment>)>(threads + 2);
        let summed = free_tx.clone();
        let summer = s.spawn(move || -> Result<Summed> {
            let mut summer = WindowSummer::new(
                virtual_size,
                |layout| store.window_sum(layout),
                |sums| store.remember_window_sums(sums),
                move |buf| {
                    let _ = summed.try_send(buf);
                },
            );
            for (buf, segments) in window_rx {
                summer.feed(&buf, &segments)?;
            }
            summer.finish()
        });

        let recycled = free_tx.clone();
        let returned = free_tx.clone();
        let segmenter = s.spawn(move || -> Result<(u64, SegmenterStats)> {
            let mut seg = Segmenter::new(params, |batch| {
                window_tx
                    .send((Arc::clone(&batch.data), batch.segments.clone()))
                    .map_err(|_| Error::Interrupted)?;
                work_tx.send(batch).map_err(|_| Error::Interrupted)
            })
            .with_hints(|id| store.hint(id))
            .with_recycler(move |buf| {
                let _ = recycled.try_send(buf);
            });
            for (piece, buf) in piece_rx {
                match piece {
                    SourcePiece::Data => seg.feed_buffer(buf, headroom)?,
                    SourcePiece::Zeros(n) => {
                        seg.feed(Piece::Zeros(n))?;
                        let _ = free_tx.try_send(buf);
                    }
                }
            }
            let (size, stats) = seg.finish_with_stats()?;
            tracing::debug!(
                "segmenter: {} chunks cut by hints, {} by FastCDC, {} hints missed",
                stats.hinted,
                stats.scanned,
                stats.missed
            );
            Ok((size, stats))
        });

        for _ in 0..threads {
            let (work_rx, done_tx, claimed) = (work_rx.clone(), done_tx.clone(), &claimed);
            let returned = returned.clone();
            s.spawn(move || {
                let mut compressor = match zstd::bulk::Compressor::new(level) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = done_tx.send(Err(Error::invalid("zstd level", e.to_string())));
                        return;
                    }
                };
                for mut batch in work_rx {
                    let done = hash_and_compress(store, claimed, &mut compressor, &mut batch);
                    // The last batch cut from a read buffer gives it back to the reader.
                    if let Some(buf) = Arc::into_inner(batch.data) {
                        let _ = returned.try_send(buf);
                    }
                    if done_tx.send(done).is_err() {
                        return;
                    }
                }
            });
        }
        drop((work_rx, done_tx));

        let written_ref = &mut written;
        let collected = collect(store, done_rx, written_ref, progress);
        let read = reader.join().unwrap_or(Err(Error::Interrupted));
        let segmented = segmenter.join().unwrap_or(Err(Error::Interrupted));
        let summed = summer.join().unwrap_or(Err(Error::Interrupted));
        match (read, segmented, summed, collected) {
            (Ok(bytes_read), Ok((size, cuts)), Ok(summed), Ok(collected)) => Ok(CommitInput {
                format,
                bytes_read,
                size,
                summed,
                collected,
                hinted_chunks: cuts.hinted,
                started,
            }),
            (read, segmented, summed, collected) => Err(first_cause([
                read.err(),
                segmented.err(),
                summed.err(),
                collected.err(),
            ])),
        }
    });
    progress.finish();

    let result = outcome.and_then(|input| commit(store, opts, record_source, input));
    if result.is_err() {
        // Nothing references these chunks: remove them now rather than waiting for gc.
        store.remove_uncommitted_values(&written);
        // And the window sums this import wrote that name a chunk no image references (the
        // zero windows' stay: they are true, and save a retry's hashing).
        let mut batch = WriteBatch::default();
        let _ = store.batch_forget_unreferenced_window_sums(&mut batch);
        let _ = store.commit(batch);
    }
    result
}

/// The error to report when stages failed, in stream order (source, segmenter, writer): a
/// stage stopped because another one failed reports [`Error::Interrupted`], so the first
/// other error is the cause (a full disk met by the writer, not the segmenter it stopped).
/// All interrupted: the user's interrupt.
fn first_cause<const N: usize>(errors: [Option<Error>; N]) -> Error {
    let mut errors: Vec<Error> = errors.into_iter().flatten().collect();
    match errors.iter().position(|e| !matches!(e, Error::Interrupted)) {
        Some(cause) => errors.swap_remove(cause),
        None => Error::Interrupted,
    }
}

fn hash_and_compress(
    store: &Store,
    claimed: &Mutex<HashSet<ChunkId>>,
    compressor: &mut zstd::bulk::Compressor<'_>,
    batch: &mut Batch,
) -> Result<Done> {
    let mut extents = Vec::with_capacity(batch.segments.len());
    let mut new_chunks = Vec::new();
    let mut dedup = 0;
    for segment in &batch.segments {
        match *segment {
            Segment::Chunk {
                offset,
                start,
                len,
                id,
            } => {
                let data = &batch.data[start..start + len];
                let seen = claimed.lock().map(|set| set.contains(&id)).unwrap_or(true);
                // Known chunks are never compressed again.
                if seen || store.chunk_is_referenced(&id)? {
                    dedup += 1;
                } else if claimed
                    .lock()
                    .map(|mut set| set.insert(id))
                    .unwrap_or(false)
                {
                    new_chunks.push((id, encode_chunk(data, compressor), len as u32));
                } else {
                    dedup += 1; // another worker claimed it meanwhile
                }
                extents.push(Extent {
                    offset,
                    len: len as u64,
                    chunk: Some(id),
                });
            }
            Segment::Zero { offset, len } => extents.push(Extent {
                offset,
                len,
                chunk: None,
            }),
        }
    }
    Ok(Done {
        seq: batch.seq,
        extents,
        new_chunks,
        dedup,
        // Moved, not cloned: the batch is dropped after this.
        hints: std::mem::take(&mut batch.hints),
    })
}

/// What the writer gathered from the batches.
struct Collected {
    extents: Vec<Extent>,
    /// (stored, raw) length of each chunk this ingest stored.
    sizes: HashMap<ChunkId, (u32, u32)>,
    dedup: u64,
    hints: Vec<(ChunkId, Hint)>,
}

/// The writer: puts new chunks in stream order and gathers the extent map.
fn collect(
    store: &Store,
    done_rx: Receiver<Result<Done>>,
    written: &mut Vec<ChunkId>,
    progress: &dyn Progress,
) -> Result<Collected> {
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    let mut extents = Vec::new();
    let mut sizes = HashMap::new();
    let mut dedup = 0;
    let mut hints = Vec::new();
    for done in done_rx {
        let done = done?;
        pending.insert(done.seq, done);
        while let Some(done) = pending.remove(&next) {
            next += 1;
            if !done.new_chunks.is_empty() {
                let mut values = Vec::with_capacity(done.new_chunks.len());
                for (id, value, raw_len) in done.new_chunks {
                    sizes.insert(id, (value.len() as u32, raw_len));
                    written.push(id);
                    values.push((id, value));
                }
                store.put_chunks_unlogged(&values)?;
            }
            progress.advance(done.extents.iter().map(|e| e.len).sum());
            dedup += done.dedup;
            extents.extend(done.extents);
            hints.extend(done.hints);
        }
    }
    Ok(Collected {
        extents,
        sizes,
        dedup,
        hints,
    })
}

struct CommitInput {
    format: String,
    bytes_read: u64,
    size: u64,
    summed: Summed,
    collected: Collected,
    hinted_chunks: u64,
    started: Instant,
}

fn commit(
    store: &Store,
    opts: &IngestOptions,
    record_source: Source,
    input: CommitInput,
) -> Result<ImportReport> {
    let Collected {
        extents,
        sizes,
        dedup,
        hints,
    } = input.collected;
    // Chunk values were written without the WAL: make them durable before the batch that
    // references them.
    store.flush_chunks()?;
    let catalog = Catalog::new(store);
    // The writer lock is held since the first check, so name and quota still hold; the
    // re-check is cheap insurance against a caller that skipped `import`'s check.
    catalog.check_create(&opts.owner, &opts.name, opts.visibility)?;
    let data: Vec<&Extent> = extents.iter().filter(|e| e.chunk.is_some()).collect();
    let record = ImageRecord {
        id: ImageId::random()?,
        name: opts.name.clone(),
        owner: opts.owner.clone(),
        visibility: opts.visibility,
        protected: opts.visibility == crate::catalog::Visibility::Public,
        virtual_size: input.size,
        nonzero_bytes: data.iter().map(|e| e.len).sum(),
        data_extents: data.len() as u64,
        new_chunks: sizes.len() as u64,
        new_stored_bytes: sizes.values().map(|(s, _)| *s as u64).sum(),
        checksum: input.summed.checksum.to_hex().to_string(),
        created: now(),
        region: store.config().region.clone(),
        source: record_source,
        parent: opts.parent,
        properties: opts.properties.clone(),
    };
    let mut batch = WriteBatch::default();
    catalog.batch_create(&mut batch, &record, &extents, &sizes)?;
    for (id, hint) in &hints {
        store.batch_hint(&mut batch, id, hint);
    }
    store.commit(batch)?;
    // A stop signal from here on must not read as a failed import.
    crate::cleanup::note_from_now_on(format!(
        "the import was complete: {}/{} ({}) exists",
        record.owner, record.name, record.id
    ));
    Ok(ImportReport {
        format: input.format,
        bytes_read: input.bytes_read,
        chunks: record.data_extents,
        new_chunks: record.new_chunks,
        new_raw_bytes: sizes.values().map(|(_, r)| *r as u64).sum(),
        new_stored_bytes: record.new_stored_bytes,
        dedup_chunks: dedup,
        hinted_chunks: input.hinted_chunks,
        windows_hashed: input.summed.stats.hashed,
        windows_remembered: input.summed.stats.remembered,
        seconds: input.started.elapsed().as_secs_f64(),
        image: record,
    })
}

#[cfg(test)]
mod tests {
    use super::first_cause;
    use crate::error::Error;

    #[test]
    fn a_stage_stopped_by_another_does_not_hide_the_cause() {
        let full = || Error::invalid("disk", "full");
        // The segmenter was stopped (its send failed) because the writer hit a full disk.
        let e = first_cause([None, Some(Error::Interrupted), Some(full())]);
        assert!(e.to_string().contains("full"), "{e}");
        // The source's own error comes first.
        let e = first_cause([Some(Error::invalid("source", "gone")), None, Some(full())]);
        assert!(e.to_string().contains("source"), "{e}");
        // Only interrupts: the user's.
        let e = first_cause([Some(Error::Interrupted), Some(Error::Interrupted), None]);
        assert!(matches!(e, Error::Interrupted));
    }
}
