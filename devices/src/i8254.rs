//! An 8254 programmable interval timer (ports 0x40-0x43) and the PC's
//! port 0x61 (channel 2's gate, the speaker data bit, channel 2's
//! output), for the split irqchip: KVM's PIT needs KVM's PICs.
//!
//! Written from Intel's "8254 Programmable Interval Timer" datasheet and
//! matched to QEMU's i8254 where the datasheet leaves room:
//!
//! - Counts are computed from the time since a count was loaded, at
//!   1.193182 MHz, never stepped; the control word's counter latch and
//!   read-back command latch counts and status.
//! - Channel 0 raises IRQ0 (an edge, `IrqLine` GSI 0) where its output
//!   rises: once in modes 0 and 4, every period in modes 2 and 3. The
//!   [`TimerClock`] calls `expire()` at the next rise; rises missed in
//!   between coalesce into one interrupt, as QEMU's
//!   `lost_tick_policy=discard` that kvm-unit-tests asks for.
//! - Only channel 2's gate is wired (port 0x61 bit 0); channels 0 and 1
//!   count freely.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{fill_all_ones, IrqLine, Persist, RestoreError, TimerClock};

/// The first counter port (channel 0; the control word is at +3).
pub const PIT_BASE: u16 = 0x40;
/// Ports at [`PIT_BASE`].
pub const PIT_PORT_COUNT: u16 = 4;
/// The PC's system control port B.
pub const PORT_B: u16 = 0x61;

/// The input clock, in Hz.
const PIT_HZ: u128 = 1_193_182;
const NS_PER_SEC: u128 = 1_000_000_000;
/// The GSI channel 0 drives (IRQ0; the MADT has no override for it).
const PIT_GSI: u32 = 0;

/// Which byte of a 16-bit count an access moves (the control word's
/// RW field, 1-3), and for the word the half done so far.
const RW_LSB: u8 = 1;
const RW_MSB: u8 = 2;
const RW_WORD0: u8 = 3;
const RW_WORD1: u8 = 4;

/// One counter. Times are on the device's [`TimerClock`].
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelState {
    /// The count loaded, 1-65536 (0 is written as 65536).
    pub count: u32,
    pub latched_count: u16,
    /// The RW state of a latched count still to be read; 0: none.
    pub count_latched: u8,
    pub status_latched: bool,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: bool,
    pub gate: bool,
    /// Nanoseconds since the count was loaded, when saved; a running
    /// device keeps the load time instead.
    pub elapsed_ns: u64,
}

struct Channel {
    s: ChannelState,
    load_ns: u64,
}

fn ticks(ns: u64) -> u64 {
    (u128::from(ns) * PIT_HZ / NS_PER_SEC) as u64
}

/// The first nanosecond at which `t` ticks have passed.
fn ns_of(t: u64) -> u64 {
    (u128::from(t) * NS_PER_SEC).div_ceil(PIT_HZ) as u64
}

impl Channel {
    fn new(mode: u8, gate: bool, now: u64) -> Self {
        Channel {
            s: ChannelState {
                count: 0x1_0000,
                rw_mode: RW_WORD0,
                read_state: RW_WORD0,
                write_state: RW_WORD0,
                mode,
                gate,
                ..Default::default()
            },
            load_ns: now,
        }
    }

    fn elapsed(&self, now: u64) -> u64 {
        ticks(now.saturating_sub(self.load_ns))
    }

    fn count_now(&self, now: u64) -> u16 {
        let (d, c) = (self.elapsed(now), u64::from(self.s.count));
        let v = match self.s.mode {
            0 | 1 | 4 | 5 => c.wrapping_sub(d) & 0xffff,
            3 => c - ((2 * d) % c),
            _ => c - (d % c),
        };
        v as u16
    }

    fn out(&self, now: u64) -> bool {
        let (d, c) = (self.elapsed(now), u64::from(self.s.count));
        match self.s.mode {
            0 => d >= c,
            1 => d < c,
            3 => d % c < c.div_ceil(2),
            4 | 5 => d == c,
            _ => d % c == 0 && d != 0,
        }
    }

    /// When the output next rises after `now`, for channel 0's IRQ.
    fn next_rise(&self, now: u64) -> Option<u64> {
        let (d, c) = (self.elapsed(now), u64::from(self.s.count));
        let t = match self.s.mode {
            0 | 4 => (d < c).then_some(c)?,
            2 | 3 => (d / c + 1) * c,
            _ => return None,
        };
        Some(self.load_ns + ns_of(t))
    }

    fn latch_count(&mut self, now: u64) {
        if self.s.count_latched == 0 {
            self.s.latched_count = self.count_now(now);
            self.s.count_latched = self.s.rw_mode;
        }
    }

    fn latch_status(&mut self, now: u64) {
        if !self.s.status_latched {
            self.s.status = (u8::from(self.out(now)) << 7)
                | (self.s.rw_mode << 4)
                | (self.s.mode << 1)
                | u8::from(self.s.bcd);
            self.s.status_latched = true;
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        let s = &mut self.s;
        if s.status_latched {
            s.status_latched = false;
            return s.status;
        }
        if s.count_latched != 0 {
            let [lo, hi] = s.latched_count.to_le_bytes();
            let (v, next) = match s.count_latched {
                RW_LSB => (lo, 0),
                RW_MSB => (hi, 0),
                _ => (lo, RW_MSB),
            };
            s.count_latched = next;
            return v;
        }
        let [lo, hi] = self.count_now(now).to_le_bytes();
        let s = &mut self.s;
        match s.read_state {
            RW_LSB => lo,
            RW_MSB => hi,
            RW_WORD0 => {
                s.read_state = RW_WORD1;
                lo
            }
            _ => {
                s.read_state = RW_WORD0;
                hi
            }
        }
    }

    /// A byte of a count; true when a whole count was loaded.
    fn write(&mut self, v: u8, now: u64) -> bool {
        let count = match self.s.write_state {
            RW_LSB => u32::from(v),
            RW_MSB => u32::from(v) << 8,
            RW_WORD0 => {
                self.s.write_latch = v;
                self.s.write_state = RW_WORD1;
                return false;
            }
            _ => {
                self.s.write_state = RW_WORD0;
                u32::from(self.s.write_latch) | (u32::from(v) << 8)
            }
        };
        self.s.count = if count == 0 { 0x1_0000 } else { count };
        self.load_ns = now;
        true
    }

    /// The gate input: a rising gate restarts modes 1, 2, 3 and 5.
    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate && !self.s.gate && matches!(self.s.mode, 1 | 2 | 3 | 5) {
            self.load_ns = now;
        }
        self.s.gate = gate;
    }
}

/// The PIT with port 0x61.
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bit 1, the speaker data enable.
    speaker_data: bool,
    /// Port 0x61 bit 4, the memory refresh request, which toggles on
    /// every read so delay loops polling it progress.
    refresh: bool,
    /// When channel 0's output next rises; `None`: no IRQ to come.
    next_irq: Option<u64>,
    irq: Arc<dyn IrqLine>,
    clock: Arc<dyn TimerClock>,
}

impl std::fmt::Debug for Pit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pit")
            .field("channel0", &self.channels[0].s)
            .field("next_irq", &self.next_irq)
            .finish_non_exhaustive()
    }
}

impl Pit {
    /// A PIT as a PC BIOS leaves it (SeaBIOS under QEMU, see KUT-ABI.md,
    /// "Interrupt controllers and timers"): channel 0 in mode 2 counting
    /// 65536 (18.2 Hz), the others in mode 3; channel 2's gate low.
    pub fn new(irq: Arc<dyn IrqLine>, clock: Arc<dyn TimerClock>) -> Self {
        let now = clock.now_ns();
        let mut pit = Pit {
            channels: [
                Channel::new(2, true, now),
                Channel::new(3, true, now),
                Channel::new(3, false, now),
            ],
            speaker_data: false,
            refresh: false,
            next_irq: None,
            irq,
            clock,
        };
        pit.rearm(now);
        pit
    }

    fn rearm(&mut self, now: u64) {
        self.next_irq = self.channels[0].next_rise(now);
        self.clock.arm(self.next_irq);
    }

    /// The timer fired: raise IRQ0 once if channel 0's output rose since
    /// the last call (any number of times), and arm the next rise.
    pub fn expire(&mut self) {
        let now = self.clock.now_ns();
        if self.next_irq.is_some_and(|t| t <= now) {
            self.irq.set_level(PIT_GSI, true);
            self.irq.set_level(PIT_GSI, false);
        }
        self.rearm(now);
    }

    fn write_control(&mut self, v: u8, now: u64) {
        let ch = usize::from(v >> 6);
        if ch == 3 {
            // Read-back: bit 5 low latches counts, bit 4 low status.
            for (i, c) in self.channels.iter_mut().enumerate() {
                if v & (2 << i) != 0 {
                    if v & 0x20 == 0 {
                        c.latch_count(now);
                    }
                    if v & 0x10 == 0 {
                        c.latch_status(now);
                    }
                }
            }
            return;
        }
        let c = &mut self.channels[ch];
        let access = (v >> 4) & 3;
        if access == 0 {
            c.latch_count(now);
            return;
        }
        c.s.rw_mode = access;
        c.s.read_state = access;
        c.s.write_state = access;
        c.s.mode = match (v >> 1) & 7 {
            // Modes 6 and 7 are 2 and 3 (the datasheet's "X" bit).
            m @ 6..=7 => m - 4,
            m => m,
        };
        c.s.bcd = v & 1 != 0;
        if c.s.bcd {
            log::debug!("i8254: BCD counting not supported; counting binary");
        }
        if ch == 0 {
            // A new mode waits for its count: no interrupt until then.
            self.next_irq = None;
            self.clock.arm(None);
        }
    }

    fn read_port(&mut self, port: u16, now: u64) -> Option<u8> {
        match port {
            0x40..=0x42 => Some(self.channels[usize::from(port - PIT_BASE)].read(now)),
            PORT_B => {
                self.refresh = !self.refresh;
                let ch2 = &self.channels[2];
                Some(
                    u8::from(ch2.s.gate)
                        | (u8::from(self.speaker_data) << 1)
                        | (u8::from(self.refresh) << 4)
                        | (u8::from(ch2.out(now)) << 5),
                )
            }
            _ => None,
        }
    }

    fn write_port(&mut self, port: u16, v: u8, now: u64) {
        match port {
            0x40..=0x42 => {
                let ch = usize::from(port - PIT_BASE);
                if self.channels[ch].write(v, now) && ch == 0 {
                    self.rearm(now);
                }
            }
            0x43 => self.write_control(v, now),
            PORT_B => {
                self.channels[2].set_gate(v & 1 != 0, now);
                self.speaker_data = v & 2 != 0;
            }
            _ => {}
        }
    }
}

impl MutDevicePio for Pit {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let now = self.clock.now_ns();
        match (data.len(), self.read_port(base.0.wrapping_add(offset), now)) {
            (1, Some(v)) => data[0] = v,
            _ => fill_all_ones(data),
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let [v] = data {
            let now = self.clock.now_ns();
            self.write_port(base.0.wrapping_add(offset), *v, now);
        }
    }
}

/// Saved state of a [`Pit`]. Times are kept as time since each count
/// was loaded, so counting goes on from where it was on any host clock.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PitState {
    pub channels: Vec<ChannelState>,
    pub speaker_data: bool,
    /// Whether channel 0 has an IRQ to come.
    pub irq_pending: bool,
}

impl Persist for Pit {
    type State = PitState;
    type Args = (Arc<dyn IrqLine>, Arc<dyn TimerClock>);
    type Error = RestoreError;

    fn save(&self) -> PitState {
        let now = self.clock.now_ns();
        let channels = self
            .channels
            .iter()
            .map(|c| ChannelState {
                elapsed_ns: now.saturating_sub(c.load_ns),
                ..c.s.clone()
            })
            .collect();
        PitState {
            channels,
            speaker_data: self.speaker_data,
            irq_pending: self.next_irq.is_some(),
        }
    }

    fn restore(
        (irq, clock): (Arc<dyn IrqLine>, Arc<dyn TimerClock>),
        state: &PitState,
    ) -> Result<Self, RestoreError> {
        let invalid = |reason: String| RestoreError::Invalid {
            device: "pit",
            reason,
        };
        if state.channels.len() != 3 {
            return Err(invalid(format!(
                "{} channels, expected 3",
                state.channels.len()
            )));
        }
        let now = clock.now_ns();
        let mut chans = Vec::with_capacity(3);
        for (i, s) in state.channels.iter().enumerate() {
            if !(1..=0x1_0000).contains(&s.count) || s.mode > 5 || s.rw_mode > RW_WORD0 {
                return Err(invalid(format!("channel {i}: {s:?}")));
            }
            chans.push(Channel {
                s: ChannelState {
                    elapsed_ns: 0,
                    ..s.clone()
                },
                load_ns: now.saturating_sub(s.elapsed_ns),
            });
        }
        let channels: [Channel; 3] = chans
            .try_into()
            .map_err(|_| invalid("channel count".into()))?;
        let mut pit = Pit {
            channels,
            speaker_data: state.speaker_data,
            refresh: false,
            next_irq: None,
            irq,
            clock,
        };
        if state.irq_pending {
            pit.rearm(now);
        } else {
            pit.clock.arm(None);
        }
        Ok(pit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{FakeClock, IrqRecorder};

    fn pit() -> (Pit, Arc<IrqRecorder>, Arc<FakeClock>) {
        let irq = Arc::new(IrqRecorder::default());
        let clock = Arc::new(FakeClock::default());
        (Pit::new(irq.clone(), clock.clone()), irq, clock)
    }

    fn out(p: &mut Pit, port: u16, v: u8) {
        p.pio_write(PioAddress(port), 0, &[v]);
    }

    fn inb(p: &mut Pit, port: u16) -> u8 {
        let mut d = [0u8];
        p.pio_read(PioAddress(port), 0, &mut d);
        d[0]
    }

    /// Nanoseconds of `t` input clock ticks.
    fn ns(t: u64) -> u64 {
        ns_of(t)
    }

    #[test]
    fn starts_as_the_bios_leaves_it() {
        let (_, _, clock) = pit();
        assert_eq!(clock.armed(), Some(ns(0x1_0000)));
    }

    #[test]
    fn mode_2_interrupts_every_period_and_coalesces_missed_ones() {
        let (mut p, irq, clock) = pit();
        out(&mut p, 0x43, 0x34);
        assert_eq!(clock.armed(), None);
        out(&mut p, 0x40, 100);
        out(&mut p, 0x40, 0);
        assert_eq!(clock.armed(), Some(ns(100)));
        clock.advance(ns(100));
        p.expire();
        assert_eq!(irq.take(), [(0, true), (0, false)]);
        assert_eq!(clock.armed(), Some(ns(200)));
        // Three periods missed: one interrupt, the next on the period.
        clock.advance(ns(350) - ns(100));
        p.expire();
        assert_eq!(irq.take(), [(0, true), (0, false)]);
        assert_eq!(clock.armed(), Some(ns(400)));
        // An early call raises nothing.
        p.expire();
        assert!(irq.take().is_empty());
    }

    #[test]
    fn mode_0_interrupts_once_at_terminal_count() {
        let (mut p, irq, clock) = pit();
        out(&mut p, 0x43, 0x30);
        out(&mut p, 0x40, 0x10);
        out(&mut p, 0x40, 0x00);
        clock.advance(ns(0x10));
        p.expire();
        assert_eq!(irq.take().len(), 2);
        assert_eq!(clock.armed(), None);
    }

    #[test]
    fn counter_latch_freezes_the_count_read() {
        let (mut p, _, clock) = pit();
        out(&mut p, 0x43, 0x34);
        out(&mut p, 0x40, 0x00);
        out(&mut p, 0x40, 0x10);
        clock.advance(ns(0x100));
        out(&mut p, 0x43, 0x00);
        clock.advance(ns(0x100));
        let v = u16::from_le_bytes([inb(&mut p, 0x40), inb(&mut p, 0x40)]);
        assert_eq!(v, 0x1000 - 0x100);
        // Unlatched, the count has moved on.
        let v = u16::from_le_bytes([inb(&mut p, 0x40), inb(&mut p, 0x40)]);
        assert_eq!(v, 0x1000 - 0x200);
    }

    #[test]
    fn read_back_latches_status_then_count() {
        let (mut p, _, clock) = pit();
        out(&mut p, 0x43, 0xb0);
        out(&mut p, 0x42, 0x00);
        out(&mut p, 0x42, 0x01);
        clock.advance(ns(0x10));
        out(&mut p, 0x43, 0xc8);
        assert_eq!(inb(&mut p, 0x42), 0x30);
        let v = u16::from_le_bytes([inb(&mut p, 0x42), inb(&mut p, 0x42)]);
        assert_eq!(v, 0x100 - 0x10);
    }

    #[test]
    fn port_61_gates_channel_2_and_shows_its_output() {
        let (mut p, _, clock) = pit();
        out(&mut p, 0x43, 0xb0);
        out(&mut p, 0x42, 0x10);
        out(&mut p, 0x42, 0x00);
        out(&mut p, 0x61, 0x01);
        assert_eq!(inb(&mut p, 0x61) & 0x21, 0x01);
        clock.advance(ns(0x10));
        assert_eq!(inb(&mut p, 0x61) & 0x20, 0x20);
        let a = inb(&mut p, 0x61) & 0x10;
        assert_ne!(a, inb(&mut p, 0x61) & 0x10);
    }

    #[test]
    fn counting_goes_on_across_save_and_restore() {
        let (mut p, _, clock) = pit();
        out(&mut p, 0x43, 0x34);
        out(&mut p, 0x40, 0x00);
        out(&mut p, 0x40, 0x10);
        clock.advance(ns(0x100));
        let state = p.save();
        // A new host clock, far ahead.
        let clock2 = Arc::new(FakeClock::default());
        clock2.advance(1 << 40);
        let irq = Arc::new(IrqRecorder::default());
        let mut q = Pit::restore((irq.clone(), clock2.clone()), &state).expect("restore");
        assert_eq!(clock2.armed(), Some((1 << 40) - ns(0x100) + ns(0x1000)));
        let v = u16::from_le_bytes([inb(&mut q, 0x40), inb(&mut q, 0x40)]);
        assert_eq!(v, 0x1000 - 0x100);
        let mut bad = state.clone();
        bad.channels[0].count = 0;
        assert!(Pit::restore((irq, clock2), &bad).is_err());
    }
}
