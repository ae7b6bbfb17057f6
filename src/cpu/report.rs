//! `kvmrun cpuid`: for every named feature, what the host has, what KVM
//! supports, what the model turns on, what kvmrun sets, and (with
//! `--probe`) what the guest sees.

use kvm_ioctls::Kvm;
use serde::Serialize;

use super::features::{self, Reg};
use super::probe::{self, ProbeError};
use super::{for_vcpu, host_cpuid, resolve, word, Avail, CpuError, CpuSpec, KvmCpuid};
use crate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

#[derive(Clone, Debug, Serialize)]
pub struct FeatureReport {
    pub name: &'static str,
    pub location: String,
    /// The CPU kvmrun runs on has it (CPUID in kvmrun's own process).
    pub host: bool,
    pub kvm: Avail,
    pub model: bool,
    pub asked: Option<bool>,
    pub set: bool,
    /// What vCPU 0 saw (probe only; None for a leaf beyond the model's
    /// limits).
    pub guest: Option<bool>,
    /// Whether every vCPU saw exactly what was set (probe only).
    pub honoured: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub spec: String,
    pub model: &'static str,
    pub vcpus: u32,
    pub features: Vec<FeatureReport>,
    pub warnings: Vec<String>,
    /// Probe only: whether CPUID.1:EBX[31:24] and CPUID.0BH:EDX matched
    /// each vCPU's APIC ID.
    pub apic_ids_match: Option<bool>,
    /// Probe only: names of the features the guest sees differently.
    pub overridden: Option<Vec<&'static str>>,
}

fn reg_index(r: Reg) -> usize {
    match r {
        Reg::Eax => 0,
        Reg::Ebx => 1,
        Reg::Ecx => 2,
        Reg::Edx => 3,
    }
}

/// Build the report for `spec` on this host; with `probe`, boot `vcpus`
/// vCPUs and ask each one.
pub fn build(
    spec: &CpuSpec,
    lenient: bool,
    vcpus: u32,
    probe: bool,
) -> Result<Report, ReportError> {
    let kvm = Kvm::new().map_err(ReportError::OpenKvm)?;
    let kc = KvmCpuid::query(&kvm)?;
    let resolved = resolve(spec, lenient, &kc)?;
    // What each vCPU gets, per-vCPU fields (HTT, APIC IDs) included.
    let tables: Vec<_> = (0..vcpus)
        .map(|id| for_vcpu(&resolved.entries, id, vcpus))
        .collect();
    let mut features: Vec<FeatureReport> = resolved
        .rows
        .iter()
        .map(|r| {
            let f = features::lookup(r.name).expect("rows come from the table");
            let host_max = host_cpuid(f.leaf & 0xf000_0000, 0)[0];
            let host =
                f.leaf <= host_max && f.is_on(host_cpuid(f.leaf, f.subleaf)[reg_index(f.reg)]);
            FeatureReport {
                name: r.name,
                location: r.location.clone(),
                host,
                kvm: r.kvm,
                model: r.model,
                asked: r.asked,
                set: f.is_on(word(&tables[0], f.leaf, f.subleaf, f.reg)),
                guest: None,
                honoured: None,
            }
        })
        .collect();
    let mut apic_ids_match = None;
    let mut overridden = None;
    if probe {
        let leaves: Vec<(u32, u32)> = tables[0].iter().map(|e| (e.function, e.index)).collect();
        let seen = probe::run(&tables, &leaves)?;
        let value = |cpu: usize, leaf: u32, sub: u32, reg: Reg| -> u32 {
            leaves
                .iter()
                .position(|&(l, s)| l == leaf && (s == sub || !features::has_subleaves(leaf)))
                .map_or(0, |i| seen[cpu][i][reg_index(reg)])
        };
        let mut ids_ok = true;
        for cpu in 0..vcpus as usize {
            let id = cpu as u32;
            if value(cpu, 1, 0, Reg::Ebx) >> 24 != id {
                ids_ok = false;
            }
            if leaves.iter().any(|&(l, _)| l == 0xb) && value(cpu, 0xb, 0, Reg::Edx) != id {
                ids_ok = false;
            }
        }
        apic_ids_match = Some(ids_ok);
        let mut names = Vec::new();
        for fr in features.iter_mut() {
            let f = features::lookup(fr.name).expect("rows come from the table");
            // A leaf beyond the model's limits is not the guest's to read.
            if !leaves.iter().any(|&(l, _)| l == f.leaf) {
                continue;
            }
            let set = fr.set;
            let saw: Vec<bool> = (0..vcpus as usize)
                .map(|c| f.is_on(value(c, f.leaf, f.subleaf, f.reg)))
                .collect();
            fr.guest = Some(saw[0]);
            let ok = saw.iter().all(|s| *s == set);
            fr.honoured = Some(ok);
            if !ok {
                names.push(fr.name);
            }
        }
        overridden = Some(names);
    }
    Ok(Report {
        spec: spec.to_string(),
        model: resolved.model,
        vcpus,
        features: std::mem::take(&mut features),
        warnings: resolved.warnings,
        apic_ids_match,
        overridden,
    })
}

fn yn(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl Report {
    /// A table for people: one line per feature.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "CPU spec: {} (model {}), {} vCPU(s)\n",
            self.spec, self.model, self.vcpus
        );
        s += &format!(
            "{:<22} {:<28} {:<4} {:<4} {:<5} {:<5} {:<4}",
            "feature", "location", "host", "kvm", "model", "asked", "set"
        );
        let probed = self.overridden.is_some();
        if probed {
            s += " guest";
        }
        s += "\n";
        for f in &self.features {
            let kvm = match f.kvm {
                Avail::Yes => "yes",
                Avail::Emulated => "emu",
                Avail::No => "no",
            };
            let asked = match f.asked {
                Some(true) => "on",
                Some(false) => "off",
                None => "-",
            };
            s += &format!(
                "{:<22} {:<28} {:<4} {:<4} {:<5} {:<5} {:<4}",
                f.name,
                f.location,
                yn(f.host),
                kvm,
                yn(f.model),
                asked,
                yn(f.set)
            );
            match (f.guest, f.honoured) {
                (Some(g), Some(ok)) => {
                    s += &format!(" {:<5}", yn(g));
                    if !ok {
                        s += " OVERRIDDEN";
                    }
                }
                _ if probed => s += " -",
                _ => {}
            }
            s = s.trim_end().to_string() + "\n";
        }
        if let Some(ids) = self.apic_ids_match {
            s += &format!(
                "APIC IDs in CPUID.1:EBX and CPUID.0BH:EDX: {}\n",
                if ids { "match every vCPU" } else { "WRONG" }
            );
        }
        if let Some(o) = &self.overridden {
            if o.is_empty() {
                s += "The guest sees every feature exactly as set.\n";
            } else {
                s += &format!(
                    "This host's KVM overrides {} feature(s): the guest does not see what kvmrun set for {}.\n",
                    o.len(),
                    o.join(", ")
                );
            }
        }
        s
    }
}
