//! `verify --repair IMAGE --from FILE | --from-store DIR`.

use std::path::PathBuf;
use std::sync::Arc;

use imgvault::catalog::Catalog;
use imgvault::store::{OpenMode, Store};
use imgvault::verify::{self, RepairSource};
use imgvault::Error;

use super::output::{self, Bar};
use super::Context;

pub fn repair(
    ctx: &Context,
    image: Option<&str>,
    from: Option<PathBuf>,
    from_store: Option<PathBuf>,
) -> anyhow::Result<i32> {
    let Some(image) = image else {
        return Err(Error::invalid("verify --repair", "name the image to repair").into());
    };
    let no_copy = || {
        Error::invalid(
            "verify --repair",
            "give a good copy: --from FILE (the disk) or --from-store DIR (another store)",
        )
    };
    if from.is_none() && from_store.is_none() {
        return Err(no_copy().into());
    }
    // Say what is wrong with the good copy before looking for damage, not only when some is
    // found.
    if let Some(file) = &from {
        std::fs::File::open(file).map_err(|e| Error::Source {
            path: file.clone(),
            source: e,
        })?;
    }
    if let Some(dir) = &from_store {
        let same = match (
            std::fs::canonicalize(dir),
            std::fs::canonicalize(&ctx.store_path),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(Error::invalid(
                "verify --repair",
                format!(
                    "--from-store {} is the store being repaired; give another store that \
                     holds the image (a copy in another region)",
                    dir.display()
                ),
            )
            .into());
        }
    }
    let store = Arc::new(ctx.open(true)?);
    // Repair writes only chunks whose bytes hash to the damaged ids, but it changes the
    // store: the owner (or admin) decides.
    let rec = Catalog::new(&store).resolve_owned(&ctx.tenant, image, "repair")?;
    let other = match &from_store {
        Some(dir) => Some(Store::open(dir, OpenMode::Reader)?),
        None => None,
    };
    let source = match (&from, &other) {
        (Some(file), _) => RepairSource::File(file),
        (None, Some(other)) => RepairSource::Store(other),
        (None, None) => return Err(no_copy().into()),
    };
    let bar = Bar::new("repair", ctx.progress);
    let report = verify::repair(&store, &rec, source, &bar)?;
    if ctx.json {
        output::json(&report)?;
    } else {
        println!(
            "{}: {} damaged chunk(s), {} rewritten from the good copy{}",
            report.image,
            report.damaged_chunks,
            report.repaired_chunks,
            if report.bytes_scanned > 0 {
                format!(" ({} examined)", output::bytes(report.bytes_scanned))
            } else {
                String::new()
            }
        );
        for id in &report.not_found {
            println!("NOT FOUND chunk {id} is not in the good copy");
        }
        for d in &report.after.damage {
            println!("DAMAGED {d}");
        }
        for p in &report.after.problems {
            println!("PROBLEM {p}");
        }
        println!(
            "verified after repair: {}",
            if report.after.is_clean() {
                "ok"
            } else {
                "still damaged"
            }
        );
    }
    if let Some(err) = report.after.error() {
        if !ctx.json {
            eprintln!("imgvault: error: {err}");
        }
        return Ok(err.exit_code());
    }
    Ok(0)
}
