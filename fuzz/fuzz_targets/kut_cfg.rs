#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| (kvmrun_fuzz::target("kut_cfg").expect("listed").run)(data)
);
