//! Criterion benches for the hot paths: chunk + hash, compression, whole ingest, read path.
//!
//! Run with `cargo bench --profile dev --bench core` (the dev profile is optimised and
//! shares RocksDB's build with the tests). Inputs are generated: half text-like
//! (compressible ~3x, like system files), half random, with zero runs.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use imgvault::chunk::{Batch, ChunkerParams, Piece, Segment, Segmenter};
use imgvault::ingest::{import_path, IngestOptions};
use imgvault::progress::NoProgress;
use imgvault::read::{ChunkCache, ImageReader};
use imgvault::store::{codec, InitOptions, OpenMode, Store};

fn disk_like(n: usize) -> Vec<u8> {
    let words = [
        "kernel ", "module ", "libc.so ", "usr/lib ", "config ", "systemd ", "0x7f3a ", "ELF ",
    ];
    let mut v = Vec::with_capacity(n);
    let mut x = 0x2545F4914F6CDD1Du64;
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match x % 8 {
            0..=3 => v.extend_from_slice(words[(x >> 8) as usize % words.len()].as_bytes()),
            4..=6 => v.extend_from_slice(&x.to_le_bytes()),
            _ => v.extend(std::iter::repeat_n(0u8, 64 + (x >> 20) as usize % 8192)),
        }
    }
    v.truncate(n);
    v
}

fn chunk_and_hash(c: &mut Criterion) {
    let data = disk_like(64 << 20);
    let mut g = c.benchmark_group("chunk+hash");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("segment_fastcdc_64k", |b| {
        b.iter(|| {
            let mut n = 0usize;
            let mut seg = Segmenter::new(ChunkerParams::default(), |batch: Batch| {
                n += batch.segments.len();
                Ok(())
            });
            seg.feed(Piece::Data(&data)).unwrap();
            seg.finish().unwrap();
            n
        })
    });
    g.bench_function("segment_and_blake3_chunks", |b| {
        b.iter(|| {
            let mut ids = 0usize;
            let mut seg = Segmenter::new(ChunkerParams::default(), |batch: Batch| {
                for s in &batch.segments {
                    if let Segment::Chunk { start, len, .. } = s {
                        ids +=
                            blake3::hash(&batch.data[*start..start + len]).as_bytes()[0] as usize;
                    }
                }
                Ok(())
            });
            seg.feed(Piece::Data(&data)).unwrap();
            seg.finish().unwrap();
            ids
        })
    });
    g.bench_function("blake3_whole_buffer", |b| b.iter(|| blake3::hash(&data)));
    g.finish();
}

fn compression(c: &mut Criterion) {
    let data = disk_like(16 << 20);
    let mut g = c.benchmark_group("compression");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    for level in [1, 3] {
        g.bench_function(format!("zstd{level}_64k_chunks"), |b| {
            let mut comp = zstd::bulk::Compressor::new(level).unwrap();
            b.iter(|| {
                data.chunks(64 << 10)
                    .map(|chunk| codec::encode_chunk(chunk, &mut comp).len())
                    .sum::<usize>()
            })
        });
    }
    let mut comp = zstd::bulk::Compressor::new(3).unwrap();
    let encoded: Vec<Vec<u8>> = data
        .chunks(64 << 10)
        .map(|chunk| codec::encode_chunk(chunk, &mut comp))
        .collect();
    g.bench_function("decode_64k_chunks", |b| {
        b.iter(|| {
            encoded
                .iter()
                .map(|v| codec::decode_chunk(v).unwrap().len())
                .sum::<usize>()
        })
    });
    g.finish();
}

fn ingest_and_read(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.img");
    let data = disk_like(128 << 20);
    std::fs::write(&src, &data).unwrap();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("import_new_store", |b| {
        b.iter_batched(
            || {
                let d = tempfile::tempdir().unwrap();
                let s = Store::init(&d.path().join("s"), &InitOptions::default()).unwrap();
                (d, s)
            },
            |(_d, s)| {
                import_path(&s, &src, &IngestOptions::new("img", "admin"), &NoProgress).unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    let store_dir = dir.path().join("store");
    let store = Store::init(&store_dir, &InitOptions::default()).unwrap();
    import_path(
        &store,
        &src,
        &IngestOptions::new("first", "admin"),
        &NoProgress,
    )
    .unwrap();
    let mut n = 0;
    g.bench_function("import_duplicate", |b| {
        b.iter(|| {
            n += 1;
            let opts = IngestOptions::new(&format!("dup{n}"), "admin");
            import_path(&store, &src, &opts, &NoProgress).unwrap()
        })
    });
    g.finish();
    drop(store);

    let store = Arc::new(Store::open(&store_dir, OpenMode::Reader).unwrap());
    let image = imgvault::catalog::Catalog::new(&store)
        .resolve_readable("admin", "first", "read")
        .unwrap();
    let mut g = c.benchmark_group("read");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("sequential_128k_reads_cold_cache", |b| {
        b.iter(|| {
            let reader = ImageReader::open(
                store.clone(),
                image.clone(),
                Arc::new(ChunkCache::new(64 << 20)),
            )
            .unwrap();
            let mut buf = vec![0u8; 128 << 10];
            let mut off = 0;
            while off < reader.size() {
                off += reader.read_at(off, &mut buf).unwrap() as u64;
            }
        })
    });
    g.bench_function("export_raw", |b| {
        let out = dir.path().join("out.img");
        let reader = ImageReader::open(
            store.clone(),
            image.clone(),
            Arc::new(ChunkCache::new(64 << 20)),
        )
        .unwrap();
        b.iter(|| imgvault::restore::export_raw(&reader, &out, true, &NoProgress).unwrap())
    });
    g.finish();
}

criterion_group!(benches, chunk_and_hash, compression, ingest_and_read);
criterion_main!(benches);
