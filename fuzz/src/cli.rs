//! Command-line values: `--cpu` (parsed, checked that its canonical form
//! reads back the same, and resolved into CPUID tables for every vCPU
//! against a KVM made from this host's CPUID), and the other flags that
//! take a syntax of their own.

use std::str::FromStr;
use std::sync::OnceLock;

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvmrun::config::{self, SerialOutput};
use kvmrun::cpu::msrs::MsrValue;
use kvmrun::cpu::{self, CpuSpec, KvmCpuid};
use kvmrun::kvmcaps::{self, CapSetting};
use kvmrun::testhost;

use crate::Input;

/// Leaves with subleaves, as KVM marks them.
const INDEXED: [u32; 8] = [4, 7, 0xb, 0xd, 0x12, 0x14, 0x1d, 0x1f];

fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
    let [eax, ebx, ecx, edx] = cpu::host_cpuid(function, index);
    kvm_cpuid_entry2 {
        function,
        index,
        flags: if INDEXED.contains(&function) {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// What a KVM on this host might offer: the host's own leaves, KVM's
/// signature leaves, and MOVBE and RDPID as emulated.
fn kvm_cpuid() -> &'static KvmCpuid {
    static KVM: OnceLock<KvmCpuid> = OnceLock::new();
    KVM.get_or_init(|| {
        let mut supported = Vec::new();
        let max = cpu::host_cpuid(0, 0)[0].min(0x20);
        for f in 0..=max {
            let subs = if INDEXED.contains(&f) { 4 } else { 1 };
            for i in 0..subs {
                supported.push(entry(f, i));
            }
        }
        supported.push(kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ebx: u32::from_le_bytes(*b"KVMK"),
            ecx: u32::from_le_bytes(*b"VMKV"),
            edx: u32::from_le_bytes(*b"M\0\0\0"),
            ..Default::default()
        });
        supported.push(kvm_cpuid_entry2 {
            function: 0x4000_0001,
            eax: 0x0100_7eff,
            ..Default::default()
        });
        let max_ext = cpu::host_cpuid(0x8000_0000, 0)[0].min(0x8000_0021);
        for f in 0x8000_0000..=max_ext {
            supported.push(entry(f, 0));
        }
        let mut movbe = entry(1, 0);
        movbe.ecx = 1 << 22;
        let mut rdpid = entry(7, 0);
        rdpid.ecx = 1 << 22;
        KvmCpuid {
            supported,
            emulated: vec![movbe, rdpid],
        }
    })
}

/// Input: one byte of flags (bit 0: `--cpu-lenient`; bit 1: resolve the
/// spec into CPUID tables; bits 2-7: vCPU count), then the spec.
/// Resolving is slow where CPUID exits to a hypervisor (the host's CPUID
/// is read on the way), so only some inputs do it.
pub fn cpu_spec(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let Ok(text) = std::str::from_utf8(input.rest()) else {
        return;
    };
    let Ok(spec) = CpuSpec::parse(text) else {
        return;
    };
    // VmConfig::validate() and snapshots rely on the canonical form
    // reading back as the same spec.
    let again = CpuSpec::parse(&spec.to_string());
    assert_eq!(again.as_ref(), Ok(&spec), "{text:?} -> {spec}");
    if flags & 2 == 0 {
        return;
    }
    let Ok(resolved) = cpu::resolve(&spec, flags & 1 != 0, kvm_cpuid()) else {
        return;
    };
    let count = u32::from(flags >> 2).clamp(1, config::MAX_VCPUS);
    for id in [0, count / 2, count - 1] {
        let mut entries = cpu::for_vcpu(&resolved.entries, id, count);
        cpu::add_timing_leaf(&mut entries, 2_000_000);
        let _ = cpu::to_kvm(&entries);
    }
}

/// Input: one byte naming the flag, then its value.
pub fn values(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.u8();
    let Ok(s) = std::str::from_utf8(input.rest()) else {
        return;
    };
    match which % 7 {
        0 => {
            let _ = config::parse_mem_size(s);
        }
        1 => {
            if let Ok(t) = config::parse_timeout(s) {
                assert!(t.is_finite() && t > 0.0, "{s:?} -> {t}");
                // What vmm::run() and --migrate-every make of it.
                let _ = std::time::Duration::from_secs_f64(t);
            }
        }
        2 => {
            if let Ok(v) = MsrValue::from_str(s) {
                let _ = cpu::msrs::initial(&[v]);
            }
        }
        3 => {
            if let Ok(c) = CapSetting::from_str(s) {
                let _ = kvmcaps::check_duplicates(&[c.clone(), c]);
            }
        }
        4 => {
            let _ = kvmcaps::parse_msr_filter(s);
        }
        5 => {
            let _ = SerialOutput::from_str(s);
        }
        _ => {
            let _ = testhost::parse_duration(s);
        }
    }
}
