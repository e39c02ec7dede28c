#![no_main]
//! The qcow2 reader on arbitrary bytes: open, then read the whole disk (within budgets).

use imgvault_fuzz::formats::disk::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| imgvault_fuzz::drive(Format::Qcow2, data));
