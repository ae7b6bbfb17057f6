#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| (kvmrun_fuzz::target("dev_debug_exit")
    .expect("listed")
    .run)(data));
