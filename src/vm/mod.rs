//! The KVM VM: memory slots, the irqchip (KVM's, or split: local APICs
//! only), the in-kernel PIT, and the interrupt and page services devices
//! reach through `devices`' traits.

use std::sync::Arc;

mod irq;
mod legacy;

pub use irq::{Interrupts, IoEvent, KvmMsiVectors};
pub use legacy::{ExtIntKick, PitClock};

use devices::{IrqLine, PageFlusher};
use kvm_bindings::{
    kvm_clock_data, kvm_enable_cap, kvm_irqchip, kvm_userspace_memory_region, KVM_CAP_SPLIT_IRQCHIP,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::{Irqchip, VmConfig};
use crate::kvmcaps::{self, CapError};
use crate::memory::{self, Layout, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::pit::{Pit, PitError};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("KVM_SET_USER_MEMORY_REGION for {addr:#x} (+{len:#x}) failed: {source}")]
    MemorySlot {
        addr: u64,
        len: u64,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Pit(#[from] PitError),
    #[error("cannot create an event fd: {0}")]
    EventFd(std::io::Error),
    #[error("KVM_SET_GSI_ROUTING: cannot build a table of {0} routes")]
    Routing(usize),
    #[error("--irqchip split: this host's KVM lacks KVM_CAP_SPLIT_IRQCHIP")]
    NoSplitIrqchip,
    #[error("{what} failed: {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn setup(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Setup { what, source }
}

pub struct Vm {
    pub kvm: Kvm,
    /// Private: other modules reach KVM through the named operations
    /// below, so what the VMM does to the VM is listed in one file.
    fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub layout: Layout,
    /// The in-kernel PIT, when the VM has one.
    pit: Option<Pit>,
    irqchip: Irqchip,
    irq: Arc<Interrupts>,
}

/// IOAPIC pins KVM keeps GSI routes for with the split irqchip: their
/// level-triggered vectors get their EOI reported (KVM_EXIT_IOAPIC_EOI).
const SPLIT_IRQCHIP_PINS: u64 = crate::layout::IOAPIC_PINS as u64;

impl Vm {
    /// Create the VM with fresh anonymous memory, irqchip and (if `pit`
    /// and the irqchip is KVM's) the in-kernel PIT.
    pub fn new(layout: Layout, pit: bool, irqchip: Irqchip) -> Result<Vm, VmError> {
        let mem = memory::create_guest_memory(&layout)?;
        Self::with_memory(layout, pit, irqchip, mem)
    }

    /// Create the VM over guest memory mapped by the caller (a snapshot's
    /// memory file), as `new()` does.
    pub fn with_memory(
        layout: Layout,
        pit: bool,
        irqchip: Irqchip,
        mem: GuestMemoryMmap,
    ) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        // Intel hosts need these before the first vCPU; other KVMs accept
        // and ignore them.
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(setup("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(setup("KVM_SET_IDENTITY_MAP_ADDR"))?;

        for (slot, (addr, len, host)) in memory::host_regions(&mem).into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: addr,
                memory_size: len,
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: the region is mapped for as long as `mem` lives, and
            // `mem` lives in the Vm alongside the VM fd.
            unsafe { fd.set_user_memory_region(region) }.map_err(|source| VmError::MemorySlot {
                addr,
                len,
                source,
            })?;
        }

        create_irqchip(&fd, irqchip)?;
        let fd = Arc::new(fd);
        // KVM's PIT needs KVM's PICs (KVM_CREATE_PIT2 fails without them).
        let pit = if pit && irqchip == Irqchip::Kernel {
            Some(Pit::create(fd.clone())?)
        } else {
            None
        };
        Ok(Vm {
            kvm,
            irq: Arc::new(Interrupts::new(fd.clone(), irqchip == Irqchip::Split)),
            fd,
            mem,
            layout,
            pit,
            irqchip,
        })
    }

    /// Where the VM's interrupt controllers live.
    pub fn irqchip_kind(&self) -> Irqchip {
        self.irqchip
    }

    /// The in-kernel PIT, if the VM has one.
    pub fn pit(&self) -> Option<&Pit> {
        self.pit.as_ref()
    }

    /// Turn on the VM-wide KVM capabilities and the MSR filter `cfg` asks
    /// for; some are refused once a vCPU exists.
    pub fn enable_caps(&self, cfg: &VmConfig) -> Result<(), CapError> {
        kvmcaps::enable(&self.fd, &cfg.kvm_caps)?;
        if !cfg.msr_filter.is_empty() {
            kvmcaps::set_msr_filter(&self.fd, &cfg.msr_filter)?;
        }
        Ok(())
    }

    pub fn create_vcpu(&self, id: u32) -> Result<VcpuFd, kvm_ioctls::Error> {
        self.fd.create_vcpu(u64::from(id))
    }

    /// KVM_CHECK_EXTENSION on the VM: 0 for an absent capability.
    pub fn check_extension_int(&self, cap: Cap) -> i32 {
        self.fd.check_extension_int(cap)
    }

    /// KVM_GET_IRQCHIP of `chip_id` (PIC master, slave, IOAPIC).
    pub fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, kvm_ioctls::Error> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd.get_irqchip(&mut chip)?;
        Ok(chip)
    }

    pub fn set_irqchip(&self, chip: &kvm_irqchip) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_irqchip(chip)
    }

    pub fn clock(&self) -> Result<kvm_clock_data, kvm_ioctls::Error> {
        self.fd.get_clock()
    }

    pub fn set_clock(&self, clock: &kvm_clock_data) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_clock(clock)
    }

    /// The TSC rate of the VM's vCPUs before any KVM_SET_TSC_KHZ (the
    /// VM-wide KVM_GET_TSC_KHZ, KVM_CAP_VM_TSC_CONTROL), if KVM says it.
    pub fn host_tsc_khz(&self) -> Option<u32> {
        vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);
        // SAFETY: the ioctl takes no argument and returns the rate.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&*self.fd, KVM_GET_TSC_KHZ()) };
        u32::try_from(ret).ok().filter(|&khz| khz > 0)
    }

    /// Interrupt lines, irqfds, MSI routes and ioeventfds.
    pub fn interrupts(&self) -> &Arc<Interrupts> {
        &self.irq
    }

    /// A level-triggered line any GSI can be driven through (pc-testdev's
    /// interrupt ports), as interrupt source 0.
    pub fn irq_line(&self) -> Arc<dyn IrqLine> {
        self.irq.line(0)
    }

    pub fn page_flusher(&self) -> Arc<dyn PageFlusher> {
        Arc::new(HostPageFlusher(self.mem.clone()))
    }
}

/// KVM's whole irqchip, or only its local APICs with the routes of
/// `SPLIT_IRQCHIP_PINS` pins reserved for kvmrun's IOAPIC.
fn create_irqchip(fd: &VmFd, irqchip: Irqchip) -> Result<(), VmError> {
    if irqchip == Irqchip::Kernel {
        return fd.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"));
    }
    if fd.check_extension_int(Cap::SplitIrqchip) <= 0 {
        return Err(VmError::NoSplitIrqchip);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = SPLIT_IRQCHIP_PINS;
    fd.enable_cap(&cap)
        .map_err(setup("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))
}

/// Drops the host mapping of a guest page so KVM must fault it in again, the
/// way QEMU's pc-testdev does it: take all access away, then give it back.
struct HostPageFlusher(GuestMemoryMmap);

impl PageFlusher for HostPageFlusher {
    fn flush_page(&self, gpa: u64) {
        let Ok(host) = self.0.get_host_address(GuestAddress(gpa & !0xfff)) else {
            log::debug!("flush-page of {gpa:#x}: not guest RAM");
            return;
        };
        // SAFETY: `host` is the page-aligned start of one page of guest RAM
        // that this process mapped; access is restored at once.
        unsafe {
            libc::mprotect(host.cast(), 4096, libc::PROT_NONE);
            libc::mprotect(host.cast(), 4096, libc::PROT_READ | libc::PROT_WRITE);
        }
    }
}
