//! What devices ask of the VM, answered without a VM: requests, interrupt
//! lines and page flushes are counted and dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::pci::{BarHost, BarMapping};
use devices::{IrqLine, MsiMessage, MsiSink, MsiVectors, PageFlusher, VmRequest, VmRequests};

#[derive(Default)]
pub struct Sink {
    pub calls: AtomicU64,
}

impl Sink {
    fn note(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

impl VmRequests for Sink {
    fn request(&self, _req: VmRequest) {
        self.note();
    }
}

impl IrqLine for Sink {
    fn set_level(&self, _gsi: u32, _level: bool) {
        self.note();
    }
}

impl PageFlusher for Sink {
    fn flush_page(&self, _gpa: u64) {
        self.note();
    }
}

pub fn requests() -> Arc<dyn VmRequests> {
    Arc::new(Sink::default())
}

pub fn irq() -> Arc<dyn IrqLine> {
    Arc::new(Sink::default())
}

pub fn flusher() -> Arc<dyn PageFlusher> {
    Arc::new(Sink::default())
}

impl MsiVectors for Sink {
    fn route(&self, _index: u16, _msg: Option<MsiMessage>) {
        self.note();
    }
    fn trigger(&self, _index: u16) {
        self.note();
    }
}

impl BarHost for Sink {
    fn bar_moved(&self, _slot: u8, _from: Option<BarMapping>, _to: Option<BarMapping>) {
        self.note();
    }
}

impl MsiSink for Sink {
    fn send(&self, _msg: MsiMessage) {
        self.note();
    }
    fn route_pin(&self, _pin: u8, _msg: MsiMessage) {
        self.note();
    }
}

pub fn msi_sink() -> Arc<dyn MsiSink> {
    Arc::new(Sink::default())
}

pub fn msi() -> Arc<dyn MsiVectors> {
    Arc::new(Sink::default())
}

pub fn bar_host() -> Arc<dyn BarHost> {
    Arc::new(Sink::default())
}
