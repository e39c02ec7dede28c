#![no_main]
//! Format detection on arbitrary bytes, then the detected reader (as `import` does).

use imgvault_fuzz::formats::disk::probe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(format) = probe(&data.to_vec()) {
        imgvault_fuzz::drive(format, data);
    }
});
