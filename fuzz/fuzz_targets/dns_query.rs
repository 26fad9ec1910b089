//! See `weft_fuzz::dns_query` (fuzz/src/lib.rs) for what this target exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::dns_query(data));
