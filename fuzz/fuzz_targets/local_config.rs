//! See `weft_fuzz::local_config` (fuzz/src/lib.rs) for what this target exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::local_config(data));
