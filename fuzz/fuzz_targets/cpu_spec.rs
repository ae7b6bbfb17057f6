#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| (kvmrun_fuzz::target("cpu_spec").expect("listed").run)(data)
);
