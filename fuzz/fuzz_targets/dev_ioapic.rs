#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| (kvmrun_fuzz::target("dev_ioapic").expect("listed").run)(data)
);
