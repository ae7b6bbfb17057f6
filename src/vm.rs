//! The KVM VM: memory slots, in-kernel irqchip, PIT, and the interrupt and
//! page services devices reach through `devices`' traits.

use std::sync::Arc;
use std::time::Instant;

use devices::{IrqLine, PageFlusher};
use kvm_bindings::{
    kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{self, Layout, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::pit_policy::{self, TickSwitch};

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
    #[error("cannot start a helper thread: {0}")]
    Spawn(std::io::Error),
    #[error("the {0} thread died")]
    Helper(&'static str),
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
    pub fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub layout: Layout,
    /// Whether the VM has the in-kernel PIT.
    pub pit: bool,
}

impl Vm {
    /// Create the VM with fresh anonymous memory, irqchip and (if `pit`) PIT.
    pub fn new(layout: Layout, pit: bool) -> Result<Vm, VmError> {
        let mem = memory::create_guest_memory(&layout)?;
        Self::with_memory(layout, pit, mem)
    }

    /// Create the VM over guest memory mapped by the caller (a snapshot's
    /// memory file), with its irqchip and (if `pit`) PIT.
    pub fn with_memory(layout: Layout, pit: bool, mem: GuestMemoryMmap) -> Result<Vm, VmError> {
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

        fd.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
        if pit {
            let cfg = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(cfg).map_err(setup("KVM_CREATE_PIT2"))?;
        }
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            mem,
            layout,
            pit,
        })
    }

    /// Start the PIT's switch to dropping missed ticks (see
    /// `pit_policy`). `loaded`: the PIT state last loaded, and when the
    /// load started. `failed` runs if the switch fails.
    pub fn drop_lost_ticks(
        &self,
        loaded: Option<&kvm_pit_state2>,
        loaded_at: Instant,
        failed: impl FnOnce(&VmError) + Send + 'static,
    ) -> Result<TickSwitch, VmError> {
        if !self.pit {
            return Ok(TickSwitch::default());
        }
        let periodic = loaded.and_then(pit_policy::period).map(|p| (loaded_at, p));
        TickSwitch::start(self.fd.clone(), periodic, failed)
    }

    /// Route writes to `evt` into GSI `gsi` (an edge).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(setup("KVM_IRQFD"))
    }

    pub fn irq_line(&self) -> Arc<dyn IrqLine> {
        Arc::new(KvmIrqLine(self.fd.clone()))
    }

    pub fn page_flusher(&self) -> Arc<dyn PageFlusher> {
        Arc::new(HostPageFlusher(self.mem.clone()))
    }
}

/// Interrupt lines through KVM_IRQ_LINE.
struct KvmIrqLine(Arc<VmFd>);

impl IrqLine for KvmIrqLine {
    fn set_level(&self, gsi: u32, level: bool) {
        if let Err(e) = self.0.set_irq_line(gsi, level) {
            log::warn!("warning: KVM_IRQ_LINE gsi {gsi} level {level}: {e}");
        }
    }
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
