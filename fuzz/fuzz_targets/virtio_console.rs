#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| (kvmrun_fuzz::target("virtio_console")
    .expect("listed")
    .run)(data));
