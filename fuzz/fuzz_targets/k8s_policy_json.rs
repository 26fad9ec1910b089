//! See `weft_fuzz::k8s_policy_json` (fuzz/src/lib.rs) for what this target exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::k8s_policy_json(data));
