//! See `weft_fuzz::cni_plugin` (fuzz/src/lib.rs) for what this target exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::cni_plugin(data));
