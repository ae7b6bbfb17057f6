#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| (kvmrun_fuzz::target("toml_suite").expect("listed").run)(data)
);
