//! Running a built VM to the end: the main event loop, the vCPU rounds,
//! and the control socket's requests between rounds.
//!
//! Each round runs the vCPUs until the VM ends, the guest suspends, or a
//! control request needs them stopped; a suspended guest is woken through
//! its firmware waking vector, requests are served, and the next round
//! starts unless the VM is paused.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::timerfd::TimerFd;

use super::events::{
    HaltPoll, PinRelay, PitTimer, SerialInput, ShutdownWatch, StdinToPort, StdinToSerial,
    TickDeadline, Timeout, HALT_POLL,
};
use super::{host, lock, sys, Machine, RunOptions, VmmError};
use crate::api::{self, ApiServer, Control, Request};
use crate::boot;
use crate::bus::IoBus;
use crate::config::SerialOutput;
use crate::gdb::{self, GdbOptions};
use crate::platform::virtio::QueueNotifier;
use crate::shutdown::STATUS_ERROR;
use crate::shutdown::{ExitReason, Shutdown};
use crate::term::RawTerminal;
use crate::vcpu::debug::{DebugHub, KvmBackend};
use crate::vcpu::{self, HaltWatch, Kick, Running, Vcpu};
use crate::vm::Vm;
use devices::i8259::Pic;

type Events = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A VM between and during its rounds.
struct Runner {
    machine: Machine,
    /// The vCPUs while they are stopped; empty during a round.
    vcpus: Vec<Vcpu>,
    shutdown: Arc<Shutdown>,
    em: Events,
    control: Arc<Control>,
    halt: Arc<HaltWatch>,
    /// The running vCPUs' kicks, for the halt poll.
    kicks: Arc<Mutex<Vec<Kick>>>,
    /// Set when the vCPUs must wait for the PIT policy switch.
    tick_hold: Arc<AtomicBool>,
    /// Where vCPUs stop for gdb (`--gdb`).
    debug: Option<Arc<DebugHub>>,
    /// The virtio queues' notifier, looked at once more at the end.
    queues: Option<Arc<Mutex<QueueNotifier>>>,
    paused: bool,
    started: Instant,
}

/// Run a built VM to the end and say why it ended.
pub(super) fn run_machine(
    mut machine: Machine,
    shutdown: Arc<Shutdown>,
    opts: &RunOptions,
    started: Instant,
) -> Result<ExitReason, VmmError> {
    let mut em = Events::new().map_err(|e| VmmError::Host {
        what: "event manager",
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    let control = Arc::new(Control::new());
    add_host_events(&mut em, &machine, &shutdown, &control, opts)?;
    // Keys go to the guest as typed while it runs; restored on return.
    // A console port reads lines: the terminal keeps its line editing
    // (a port is no tty in the guest, which would echo nothing).
    let _raw_terminal = if machine.cfg.serial == SerialOutput::Stdio && machine.stdin_port.is_none()
    {
        RawTerminal::enter()
    } else {
        None
    };
    vcpu::install_kick_handler();
    let halt = Arc::new(HaltWatch::new(machine.cfg.vcpus));
    let kicks = Arc::new(Mutex::new(Vec::new()));
    add_halt_poll(&mut em, &halt, &kicks, &shutdown)?;
    let tick_hold = watch_tick_deadline(&mut em, &machine, &shutdown)?;
    if let Some((pit, clock)) = machine.vm.interrupts().pit() {
        em.add_subscriber(Arc::new(Mutex::new(PitTimer { pit, clock })));
    }
    let relays = machine.vm.interrupts().take_relays();
    if !relays.is_empty() {
        em.add_subscriber(Arc::new(Mutex::new(PinRelay {
            irq: machine.vm.interrupts().clone(),
            fds: relays,
        })));
    }
    let queue_events = machine.platform.take_queue_events();
    let queues =
        (!queue_events.is_empty()).then(|| Arc::new(Mutex::new(QueueNotifier::new(queue_events))));
    if let Some(q) = &queues {
        em.add_subscriber(q.clone());
    }
    let gdb = match &opts.gdb {
        Some(g) => Some(start_gdb(g, &machine, &kicks, &shutdown)?),
        None => None,
    };
    let vcpus = std::mem::take(&mut machine.vcpus);
    let mut r = Runner {
        machine,
        vcpus,
        shutdown,
        em,
        control,
        halt,
        kicks,
        tick_hold,
        debug: gdb.as_ref().map(|g| g.0.clone()),
        queues,
        paused: false,
        started,
    };
    // From here on the guest runs: only the calls the VMM thread's list
    // allows (each vCPU thread narrows them further for itself).
    crate::sandbox::enter(crate::sandbox::Kind::Vmm)?;
    r.run_rounds();
    if let Some((hub, thread)) = gdb {
        // gdb hears the exit status ('W') before kvmrun exits.
        hub.end(r.shutdown.reason().map_or(STATUS_ERROR, |x| x.status()));
        let _ = thread.join();
    }
    Ok(r.finish())
}

/// Bind `--gdb`'s socket and start the stub's thread (before the VMM
/// thread's filter, so the stub's own list is all that applies to it).
fn start_gdb(
    g: &GdbOptions,
    machine: &Machine,
    kicks: &Arc<Mutex<Vec<Kick>>>,
    shutdown: &Arc<Shutdown>,
) -> Result<(Arc<DebugHub>, std::thread::JoinHandle<()>), VmmError> {
    let listener = gdb::Listener::bind(&g.address)?;
    let n = machine.cfg.vcpus;
    let hub = Arc::new(
        DebugHub::new(n, g.wait, kicks.clone(), shutdown.clone()).map_err(host("eventfd"))?,
    );
    let layout = gdb::layout_for(g.arch, &machine.cfg.image);
    let backend = KvmBackend::new(hub.clone(), machine.vm.mem.clone(), n);
    let target = gdb::target::GdbTarget::new(backend, layout);
    let events = hub.event_fd();
    let thread = std::thread::Builder::new()
        .name("gdb".into())
        .spawn(move || {
            if let Err(e) = crate::sandbox::enter(crate::sandbox::Kind::Gdb) {
                eprintln!("kvmrun: gdb: {e}");
                return;
            }
            gdb::serve(listener, target, events)
        })
        .map_err(host("gdb thread"))?;
    if g.wait {
        eprintln!(
            "kvmrun: waiting for gdb: {}",
            gdb::gdb_command(&g.address, &machine.cfg.image)
        );
    }
    Ok((hub, thread))
}

/// The exit event, the `--timeout` timer, stdin and `--serial-input` to
/// COM1 and the control socket.
fn add_host_events(
    em: &mut Events,
    machine: &Machine,
    shutdown: &Arc<Shutdown>,
    control: &Arc<Control>,
    opts: &RunOptions,
) -> Result<(), VmmError> {
    em.add_subscriber(Arc::new(Mutex::new(ShutdownWatch(shutdown.clone()))));
    if let Some(t) = machine.cfg.timeout_secs {
        let mut timer = TimerFd::new().map_err(sys("timerfd"))?;
        timer
            .reset(Duration::from_secs_f64(t), None)
            .map_err(sys("timerfd"))?;
        em.add_subscriber(Arc::new(Mutex::new(Timeout {
            timer,
            shutdown: shutdown.clone(),
        })));
    }
    if let Some(inbox) = &machine.stdin_port {
        em.add_subscriber(Arc::new(Mutex::new(StdinToPort::new(inbox.clone()))));
    } else if machine.cfg.serial == SerialOutput::Stdio {
        em.add_subscriber(Arc::new(Mutex::new(StdinToSerial {
            serial: machine.serial.clone(),
        })));
    }
    if let Some(text) = &opts.serial_input {
        em.add_subscriber(Arc::new(Mutex::new(SerialInput {
            serial: machine.serial.clone(),
            pending: text.iter().copied().collect(),
            timer: TimerFd::new().map_err(sys("timerfd"))?,
        })));
    }
    if let Some(path) = &opts.api {
        let server = ApiServer::bind(path, control.clone(), shutdown.clone())?;
        em.add_subscriber(Arc::new(Mutex::new(server)));
    }
    Ok(())
}

fn add_halt_poll(
    em: &mut Events,
    halt: &Arc<HaltWatch>,
    kicks: &Arc<Mutex<Vec<Kick>>>,
    shutdown: &Arc<Shutdown>,
) -> Result<(), VmmError> {
    let mut timer = TimerFd::new().map_err(sys("timerfd"))?;
    timer
        .reset(HALT_POLL, Some(HALT_POLL))
        .map_err(sys("timerfd"))?;
    em.add_subscriber(Arc::new(Mutex::new(HaltPoll {
        timer,
        watch: halt.clone(),
        kicks: kicks.clone(),
        shutdown: shutdown.clone(),
    })));
    Ok(())
}

/// Arrange for the vCPUs to stop at the PIT policy switch's deadline if
/// the switch is late; the returned flag says they must wait for it.
fn watch_tick_deadline(
    em: &mut Events,
    machine: &Machine,
    shutdown: &Arc<Shutdown>,
) -> Result<Arc<AtomicBool>, VmmError> {
    let hold = Arc::new(AtomicBool::new(false));
    match machine.ticks.deadline() {
        None => {}
        Some(deadline) if deadline <= Instant::now() => hold.store(true, Ordering::SeqCst),
        Some(deadline) => {
            let mut timer = TimerFd::new().map_err(sys("timerfd"))?;
            // A zero duration would disarm the timer.
            let left = deadline.saturating_duration_since(Instant::now());
            timer
                .reset(left.max(Duration::from_nanos(1)), None)
                .map_err(sys("timerfd"))?;
            em.add_subscriber(Arc::new(Mutex::new(TickDeadline {
                timer,
                landed: machine.ticks.landed_flag(),
                hold: hold.clone(),
                shutdown: shutdown.clone(),
            })));
        }
    }
    Ok(hold)
}

impl Runner {
    fn run_rounds(&mut self) {
        let mut first_round = true;
        loop {
            if !self.paused {
                if !self.run_round(&mut first_round) {
                    break;
                }
            } else if !self.wait_while_paused() {
                break;
            }
            self.shutdown.clear_pause();
            self.serve_requests();
        }
    }

    /// Run the vCPUs until they must stop; false when the VM has ended.
    fn run_round(&mut self, first_round: &mut bool) -> bool {
        if self.tick_hold.swap(false, Ordering::SeqCst) {
            log::debug!("vCPUs wait for the PIT policy switch");
            if let Err(e) = self.machine.ticks.join() {
                self.shutdown.request(ExitReason::Error(e.to_string()));
                return false;
            }
            log::debug!(
                "PIT policy switch landed {:?} after process start",
                self.started.elapsed()
            );
        }
        let vcpus = std::mem::take(&mut self.vcpus);
        let threads = start_vcpus(
            vcpus,
            self.machine.platform.bus(),
            &self.shutdown,
            &self.halt,
            &self.debug,
            self.machine.vm.interrupts().pic(),
        );
        if std::mem::take(first_round) {
            log::debug!(
                "vCPUs running {:?} after process start",
                self.started.elapsed()
            );
        }
        *lock(&self.kicks) = threads.iter().map(Running::kick).collect();
        let extint = self.machine.vm.interrupts().extint_kick();
        extint.set(threads.first().map(Running::kick));
        while !self.shutdown.must_stop() {
            self.poll_events();
        }
        if let Some(hub) = &self.debug {
            hub.wake();
        }
        lock(&self.kicks).clear();
        extint.set(None);
        self.vcpus = stop_vcpus(threads);
        if self.shutdown.is_requested() || self.vcpus.len() != self.machine.cfg.vcpus as usize {
            return false;
        }
        if self.shutdown.is_suspended() {
            if let Err(e) = wake_from_s3(&self.vcpus, &self.machine.vm, self.machine.facs) {
                self.shutdown
                    .request(ExitReason::Error(format!("cannot wake from S3: {e}")));
                return false;
            }
            log::info!("guest woke from S3");
            self.shutdown.resume();
        }
        true
    }

    /// Serve events until a control request comes; false when the VM has
    /// ended meanwhile.
    fn wait_while_paused(&mut self) -> bool {
        while !self.shutdown.is_requested() && !self.control.has_pending() {
            self.poll_events();
        }
        !self.shutdown.is_requested()
    }

    fn poll_events(&mut self) {
        if let Err(e) = self.em.run() {
            self.shutdown
                .request(ExitReason::Error(format!("event loop: {e:?}")));
        }
    }

    /// Answer every pending control request; the vCPUs are stopped.
    fn serve_requests(&mut self) {
        for (req, reply) in self.control.take() {
            let answer = match req {
                Request::Pause {} => {
                    self.paused = true;
                    Ok(serde_json::json!({}))
                }
                Request::Resume {} => {
                    self.paused = false;
                    Ok(serde_json::json!({}))
                }
                Request::Snapshot { .. }
                    if self.debug.as_ref().is_some_and(|h| h.is_attached()) =>
                {
                    Err(
                        "cannot snapshot while gdb is attached: breakpoints and vCPUs stopped \
                         by gdb are not VM state; detach gdb first"
                            .to_string(),
                    )
                }
                Request::Snapshot { dir, stop } => {
                    match self.machine.snapshot(&mut self.vcpus, &dir) {
                        Ok(stats) => {
                            self.paused |= stop;
                            Ok(serde_json::json!({
                                "dir": dir,
                                "memory_bytes_written": stats.memory_bytes_written,
                                "memory_digest": format!("{:016x}", stats.memory.digest),
                                "state_bytes": stats.state_bytes,
                                "save_us": stats.elapsed.as_micros() as u64,
                            }))
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                // Answered by the server itself.
                Request::Status {} | Request::Quit {} => Ok(serde_json::json!({})),
            };
            self.control.set_paused(self.paused);
            api::reply(reply, answer, self.paused);
        }
        self.control.set_paused(self.paused);
    }

    /// Tear the VM down and say why it ended.
    fn finish(mut self) -> ExitReason {
        if log::log_enabled!(log::Level::Info) {
            log::info!("guest RAM resident: {} KiB", resident_kib(&self.machine.vm));
        }
        // A failed switch has ended the VM through its `failed` callback.
        let _ = self.machine.ticks.join();
        drop(self.vcpus);
        if let Some(q) = &self.queues {
            lock(q).look_at_all();
        }
        if let Some(output) = &self.machine.output {
            output.finish();
        }
        for output in &self.machine.port_outputs {
            output.finish();
        }
        drop(self.machine);
        let _ = std::io::stdout().flush();
        self.shutdown
            .reason()
            .unwrap_or(ExitReason::Error("no exit reason".into()))
    }
}

/// Start one thread per vCPU. A thread that cannot start ends the VM.
fn start_vcpus(
    vcpus: Vec<Vcpu>,
    bus: &Arc<IoBus>,
    shutdown: &Arc<Shutdown>,
    halt: &Arc<HaltWatch>,
    debug: &Option<Arc<DebugHub>>,
    pic: Option<Arc<Mutex<Pic>>>,
) -> Vec<Running> {
    let mut threads = Vec::with_capacity(vcpus.len());
    for mut v in vcpus {
        if v.id == 0 {
            v.set_extint(pic.clone());
        }
        match v.start(bus.clone(), shutdown.clone(), halt.clone(), debug.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                shutdown.request(ExitReason::Error(format!(
                    "cannot start a vCPU thread: {e}"
                )));
                break;
            }
        }
    }
    threads
}

/// Take the vCPUs back from their threads; `Shutdown::must_stop()` is
/// already true, so one kick each suffices.
fn stop_vcpus(threads: Vec<Running>) -> Vec<Vcpu> {
    threads.into_iter().filter_map(Running::stop).collect()
}

/// Resume from S3 the way firmware does after the wake event: the boot
/// CPU restarts in real mode at the FACS waking vector, the others wait
/// for INIT/SIPI. Memory is kept, as in suspend-to-RAM.
fn wake_from_s3(vcpus: &[Vcpu], vm: &Vm, facs: u64) -> Result<(), VmmError> {
    let vector: u32 = vm
        .mem
        .read_obj(GuestAddress(facs + boot::acpi::FACS_WAKING_VECTOR))
        .map_err(|e| VmmError::Host {
            what: "reading the FACS waking vector",
            source: std::io::Error::other(e.to_string()),
        })?;
    for v in vcpus {
        if v.id == 0 {
            v.enter_waking_vector(vector)?;
        } else {
            v.wait_for_sipi()?;
        }
    }
    Ok(())
}

/// Guest RAM the host has backed with pages, for the benchmark's "RSS beyond
/// guest memory touched".
fn resident_kib(vm: &Vm) -> u64 {
    let mut pages = 0u64;
    for (_, len, host) in crate::memory::host_regions(&vm.mem) {
        let n = len.div_ceil(4096) as usize;
        let mut vec = vec![0u8; n];
        // SAFETY: `host..host + len` is one mapping of guest RAM owned by `vm`.
        if unsafe { libc::mincore(host as *mut libc::c_void, len as usize, vec.as_mut_ptr()) } == 0
        {
            pages += vec.iter().filter(|b| **b & 1 != 0).count() as u64;
        }
    }
    pages * 4
}
