//! Store-size study (issue 7): how small could the chunk store get on a series of disk images,
//! and at what cost in compression time, if chunks were compressed differently?
//!
//! Usage (as in docs/PERFORMANCE.md, "Store size: where the bytes go"):
//!
//!     cargo bench --profile dev --bench compression_study -- a.img b.img c.img d.img
//!
//! The images are cut as imgvault cuts them (FastCDC v2020 16/64/256 KiB; all-zero chunks
//! dropped, approximating zero extents), deduplicated by BLAKE3 across the images in order, and
//! the unique chunks, in first-seen order, are compressed:
//! * one zstd frame per chunk (what format v1 stores) at levels 1, 3 and 6;
//! * one frame per chunk with a 112 KiB dictionary trained (ZDICT) on every 20th unique chunk,
//!   at levels 1 and 3;
//! * "packs": runs of consecutive unique chunks compressed as one frame of >= 256 KiB, 1 MiB or
//!   4 MiB, at levels 1 and 3 (what a pack-based format would store; decode time is shown
//!   because a random 4 KiB read would decode a whole pack).
//!
//! Options: `--levels=1,2,3` sets the per-chunk levels (default 1,3,6); `--per-chunk-only`
//! skips the dictionary and pack rows (a quick level comparison).
//!
//! Times are wall seconds on all cores (rayon), for comparing rows of one run only. It also
//! prints the time of FastCDC's cut points alone over each image (`fastcdc::v2020::cut` on
//! one core, the image in memory): the floor of the ingest's segmenter.

use std::collections::HashSet;
use std::time::Instant;

use rayon::prelude::*;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let usage = "usage: cargo bench --profile dev --bench compression_study -- \
                 [--levels=L,L,...] [--per-chunk-only] IMAGE...";
    if paths.is_empty() {
        eprintln!("{usage}");
        return;
    }
    let mut levels = vec![1, 3, 6];
    if let Some(list) = args.iter().find_map(|a| a.strip_prefix("--levels=")) {
        match list
            .split(',')
            .map(str::parse::<i32>)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(l) if !l.is_empty() => levels = l,
            _ => {
                eprintln!("compression_study: --levels={list}: not a list of zstd levels\n{usage}");
                std::process::exit(2);
            }
        }
    }
    let per_chunk_only = args.iter().any(|a| a == "--per-chunk-only");
    let mut seen = HashSet::new();
    let mut unique: Vec<Vec<u8>> = Vec::new();
    for path in &paths {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("compression_study: {path}: {e}");
                std::process::exit(1);
            }
        };
        let cutting = Instant::now();
        let cuts = fastcdc::v2020::FastCDC::new(&data, 16 << 10, 64 << 10, 256 << 10).count();
        let cut_s = cutting.elapsed().as_secs_f64();
        println!(
            "{path}: FastCDC cut points alone: {cuts} chunks of {:.0} MB in {cut_s:.2} s",
            data.len() as f64 / 1e6
        );
        for c in fastcdc::v2020::FastCDC::new(&data, 16 << 10, 64 << 10, 256 << 10) {
            let bytes = &data[c.offset..c.offset + c.length];
            if bytes.iter().all(|&b| b == 0) {
                continue;
            }
            if seen.insert(*blake3::hash(bytes).as_bytes()) {
                unique.push(bytes.to_vec());
            }
        }
        let total: usize = unique.iter().map(Vec::len).sum();
        println!(
            "after {path}: {} unique chunks, {:.0} MB",
            unique.len(),
            total as f64 / 1e6
        );
    }
    let total: usize = unique.iter().map(Vec::len).sum();
    println!();
    println!("| layout | zstd level | stored MB | stored / unique | compress s | decode s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for &level in &levels {
        report("one frame per chunk", level, &unique, total);
    }
    if per_chunk_only {
        return;
    }
    let samples: Vec<&[u8]> = unique.iter().step_by(20).map(Vec::as_slice).collect();
    let sizes: Vec<usize> = samples.iter().map(|s| s.len()).collect();
    match zstd::dict::from_continuous(&samples.concat(), &sizes, 112 << 10) {
        Ok(dict) => {
            for level in [1, 3] {
                report_with(
                    "one frame per chunk, 112 KiB dictionary",
                    level,
                    &unique,
                    total,
                    &dict,
                );
            }
        }
        Err(e) => eprintln!("compression_study: dictionary training failed: {e}"),
    }
    for pack in [256usize << 10, 1 << 20, 4 << 20] {
        let mut packs: Vec<Vec<u8>> = Vec::new();
        let mut current = Vec::new();
        for chunk in &unique {
            current.extend_from_slice(chunk);
            if current.len() >= pack {
                packs.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            packs.push(current);
        }
        for level in [1, 3] {
            report(
                &format!("packs of >= {} KiB", pack >> 10),
                level,
                &packs,
                total,
            );
        }
    }
}

/// Compresses every frame of `frames` at `level`, decodes them again, prints a table row.
fn report(layout: &str, level: i32, frames: &[Vec<u8>], total: usize) {
    report_with(layout, level, frames, total, &[]);
}

/// As [`report`], with a zstd dictionary (none when empty).
fn report_with(layout: &str, level: i32, frames: &[Vec<u8>], total: usize, dict: &[u8]) {
    let started = Instant::now();
    let compressed: Vec<Vec<u8>> = frames
        .par_iter()
        .map_init(
            || zstd::bulk::Compressor::with_dictionary(level, dict).expect("zstd level"),
            |c, f| c.compress(f).expect("zstd compress"),
        )
        .collect();
    let compress_s = started.elapsed().as_secs_f64();
    // A frame zstd cannot shrink is stored raw, as imgvault does.
    let stored: usize = compressed
        .iter()
        .zip(frames)
        .map(|(c, f)| c.len().min(f.len()))
        .sum();
    let started = Instant::now();
    let decoded: usize = compressed
        .par_iter()
        .zip(frames)
        .map_init(
            || zstd::bulk::Decompressor::with_dictionary(dict).expect("zstd context"),
            |d, (c, f)| d.decompress(c, f.len()).expect("zstd decode").len(),
        )
        .sum();
    assert_eq!(decoded, total);
    println!(
        "| {layout} | {level} | {:.0} | {:.3} | {compress_s:.2} | {:.2} |",
        stored as f64 / 1e6,
        stored as f64 / total as f64,
        started.elapsed().as_secs_f64()
    );
}
