//! Putting images back on disk: export to a raw file (sparse).

mod export;

pub use export::{export_raw, ExportReport};
