#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| (kvmrun_fuzz::target("dev_i8042").expect("listed").run)(data)
);
