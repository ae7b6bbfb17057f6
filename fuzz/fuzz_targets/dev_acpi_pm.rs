#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| (kvmrun_fuzz::target("dev_acpi_pm")
    .expect("listed")
    .run)(data));
