//! ACPI PM register block: PM1a event and control blocks and the PM timer.
//!
//! The VMM's FADT points the guest at these ports ([`PM_BASE`] plus the
//! `*_OFFSET`s). A write of `SLP_TYP = S5` with `SLP_EN` to PM1_CNT powers
//! the VM off; the PM timer gives the guest a clocksource that needs no
//! calibration.
//!
//! The block is accessed byte-lane by byte-lane: an access of any width at
//! any offset touches the registers its bytes fall on, so a guest using 8-,
//! 16- or 32-bit accesses sees the same registers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{fill_all_ones, Persist, RestoreError, VmRequest, VmRequests};

/// First port of the block.
pub const PM_BASE: u16 = 0x600;
/// Ports in the block.
pub const PM_SIZE: u16 = 0x10;
/// PM1a event block (PM1_STS, PM1_EN) offset from [`PM_BASE`].
pub const PM1_EVT_OFFSET: u16 = 0x0;
/// PM1a event block length (FADT `PM1_EVT_LEN`).
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a control block (PM1_CNT) offset from [`PM_BASE`].
pub const PM1_CNT_OFFSET: u16 = 0x4;
/// PM1a control block length (FADT `PM1_CNT_LEN`).
pub const PM1_CNT_LEN: u8 = 2;
/// PM timer offset from [`PM_BASE`].
pub const PM_TMR_OFFSET: u16 = 0x8;
/// PM timer block length (FADT `PM_TMR_LEN`).
pub const PM_TMR_LEN: u8 = 4;
/// PM timer frequency fixed by the ACPI specification.
pub const PM_TIMER_FREQ_HZ: u64 = 3_579_545;
/// `SLP_TYP` value of S5 (soft off), matching the VMM's DSDT `\_S5` package.
pub const S5_SLP_TYP: u8 = 0;
/// `SLP_TYP` value of S3 (suspend to RAM), matching the DSDT `\_S3` package.
pub const S3_SLP_TYP: u8 = 1;
/// PM1_STS: RTC_STS, the RTC alarm woke the system.
const PM1_STS_RTC: u16 = 1 << 10;
/// PM1_STS: WAK_STS, the system has woken from a sleep state.
const PM1_STS_WAK: u16 = 1 << 15;
/// PM1_EN: RTC_EN, the RTC alarm may wake the system.
const PM1_EN_RTC: u16 = 1 << 10;

/// PM1_CNT: SCI_EN, set while the platform is in ACPI mode.
pub const PM1_CNT_SCI_EN: u16 = 1 << 0;
/// PM1_CNT: GBL_RLS, write-only.
const PM1_CNT_GBL_RLS: u16 = 1 << 2;
/// PM1_CNT: SLP_TYP field shift and mask.
const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
const PM1_CNT_SLP_TYP_MASK: u16 = 0x7 << PM1_CNT_SLP_TYP_SHIFT;
/// PM1_CNT: SLP_EN, write-only; writing 1 enters the sleep state in SLP_TYP.
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;

/// The timer is 24 bits wide (FADT flag TMR_VAL_EXT clear).
const PM_TMR_MASK: u32 = 0x00ff_ffff;

/// Returns the PM timer value `elapsed` after the timer read `start`.
pub fn pm_timer_value(start: u32, elapsed: Duration) -> u32 {
    // Work in u128: nanoseconds times 3.58 MHz overflows u64 after ~80 min.
    let ticks = elapsed.as_nanos() * u128::from(PM_TIMER_FREQ_HZ) / 1_000_000_000;
    let ticks = (ticks & u128::from(PM_TMR_MASK)) as u32;
    start.wrapping_add(ticks) & PM_TMR_MASK
}

/// The ACPI PM1a event/control blocks and PM timer.
pub struct AcpiPm {
    pm1_sts: u16,
    pm1_en: u16,
    /// Latched PM1_CNT bits; SCI_EN always set, write-only bits never set.
    pm1_cnt: u16,
    /// Host instant at which the timer read `timer_start`.
    timer_base: Instant,
    timer_start: u32,
    requests: Arc<dyn VmRequests>,
}

impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPm")
            .field("pm1_sts", &self.pm1_sts)
            .field("pm1_en", &self.pm1_en)
            .field("pm1_cnt", &self.pm1_cnt)
            .finish_non_exhaustive()
    }
}

/// A register that a byte of the block belongs to.
#[derive(Clone, Copy)]
enum Reg {
    Pm1Sts,
    Pm1En,
    Pm1Cnt,
    PmTmr,
}

/// Returns the offset from [`PM_BASE`] of an access, decoding on the absolute
/// port so that the device answers the same however the VMM splits its
/// ranges (one 0x10-port range or one range per block).
fn block_offset(base: PioAddress, offset: PioAddressOffset) -> Option<u64> {
    (u64::from(base.0) + u64::from(offset)).checked_sub(u64::from(PM_BASE))
}

/// Maps a byte offset in the block to its register and byte lane.
fn reg_at(offset: u64) -> Option<(Reg, usize)> {
    let lane = (offset % 2) as usize;
    match offset {
        0..=1 => Some((Reg::Pm1Sts, lane)),
        2..=3 => Some((Reg::Pm1En, lane)),
        4..=5 => Some((Reg::Pm1Cnt, lane)),
        8..=11 => Some((Reg::PmTmr, (offset - 8) as usize)),
        _ => None,
    }
}

impl AcpiPm {
    /// Creates the block in ACPI mode with the timer starting at 0; power-off
    /// requests go to `requests`.
    pub fn new(requests: Arc<dyn VmRequests>) -> Self {
        Self::with_timer(requests, 0, Instant::now())
    }

    fn with_timer(requests: Arc<dyn VmRequests>, timer_start: u32, timer_base: Instant) -> Self {
        AcpiPm {
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: PM1_CNT_SCI_EN,
            timer_base,
            timer_start: timer_start & PM_TMR_MASK,
            requests,
        }
    }

    /// PM timer value at host time `now`.
    pub fn timer_at(&self, now: Instant) -> u32 {
        pm_timer_value(
            self.timer_start,
            now.saturating_duration_since(self.timer_base),
        )
    }

    fn read_at(&self, data: &mut [u8], first: u64, now: Instant) {
        let timer = self.timer_at(now).to_le_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            let reg = first.checked_add(i as u64).and_then(reg_at);
            *out = match reg {
                Some((Reg::Pm1Sts, lane)) => self.pm1_sts.to_le_bytes()[lane],
                Some((Reg::Pm1En, lane)) => self.pm1_en.to_le_bytes()[lane],
                Some((Reg::Pm1Cnt, lane)) => self.pm1_cnt.to_le_bytes()[lane],
                Some((Reg::PmTmr, lane)) => timer[lane],
                None => 0xff,
            };
        }
    }

    fn write_at(&mut self, data: &[u8], first: u64) {
        let mut sts_clear = [0u8; 2];
        let mut en = self.pm1_en.to_le_bytes();
        let mut cnt = self.pm1_cnt.to_le_bytes();
        let mut cnt_written = false;
        for (i, byte) in data.iter().enumerate() {
            match first.checked_add(i as u64).and_then(reg_at) {
                Some((Reg::Pm1Sts, lane)) => sts_clear[lane] = *byte,
                Some((Reg::Pm1En, lane)) => en[lane] = *byte,
                Some((Reg::Pm1Cnt, lane)) => {
                    cnt[lane] = *byte;
                    cnt_written = true;
                }
                // The timer is read-only; reserved bytes are ignored.
                Some((Reg::PmTmr, _)) | None => {}
            }
        }
        // PM1_STS bits are write-1-to-clear.
        self.pm1_sts &= !u16::from_le_bytes(sts_clear);
        self.pm1_en = u16::from_le_bytes(en);
        if cnt_written {
            self.write_pm1_cnt(u16::from_le_bytes(cnt));
        }
    }

    fn write_pm1_cnt(&mut self, value: u16) {
        // Keep SCI_EN set: with no SMI command port the platform never leaves
        // ACPI mode. Drop the write-only bits so that they read as 0.
        self.pm1_cnt = (value | PM1_CNT_SCI_EN) & !(PM1_CNT_SLP_EN | PM1_CNT_GBL_RLS);
        if value & PM1_CNT_SLP_EN == 0 {
            return;
        }
        let slp_typ = ((value & PM1_CNT_SLP_TYP_MASK) >> PM1_CNT_SLP_TYP_SHIFT) as u8;
        if slp_typ == S5_SLP_TYP {
            self.requests.request(VmRequest::PowerOff);
        } else if slp_typ == S3_SLP_TYP {
            // The VMM wakes the guest at once, as if the wake event came
            // immediately; report the wake the way hardware leaves it.
            self.pm1_sts |= PM1_STS_WAK;
            if self.pm1_en & PM1_EN_RTC != 0 {
                self.pm1_sts |= PM1_STS_RTC;
            }
            self.requests.request(VmRequest::Suspend);
        } else {
            log::debug!("acpi_pm: ignoring sleep request with SLP_TYP {slp_typ}");
        }
    }
}

impl MutDevicePio for AcpiPm {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match block_offset(base, offset) {
            Some(first) => self.read_at(data, first, Instant::now()),
            None => fill_all_ones(data),
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(first) = block_offset(base, offset) {
            self.write_at(data, first);
        }
    }
}

/// Saved state of an [`AcpiPm`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AcpiPmState {
    pub pm1_sts: u16,
    pub pm1_en: u16,
    pub pm1_cnt: u16,
    /// PM timer value at save time; the restored timer counts on from this value.
    pub pm_tmr: u32,
}

impl AcpiPm {
    fn save_at(&self, now: Instant) -> AcpiPmState {
        AcpiPmState {
            pm1_sts: self.pm1_sts,
            pm1_en: self.pm1_en,
            pm1_cnt: self.pm1_cnt,
            pm_tmr: self.timer_at(now),
        }
    }

    fn restore_at(
        requests: Arc<dyn VmRequests>,
        state: &AcpiPmState,
        now: Instant,
    ) -> Result<Self, RestoreError> {
        if state.pm_tmr & !PM_TMR_MASK != 0 {
            return Err(RestoreError::Invalid {
                device: "acpi_pm",
                reason: format!("PM timer value {:#x} exceeds 24 bits", state.pm_tmr),
            });
        }
        let mut pm = Self::with_timer(requests, state.pm_tmr, now);
        pm.pm1_sts = state.pm1_sts;
        pm.pm1_en = state.pm1_en;
        pm.pm1_cnt = (state.pm1_cnt | PM1_CNT_SCI_EN) & !(PM1_CNT_SLP_EN | PM1_CNT_GBL_RLS);
        Ok(pm)
    }
}

impl Persist for AcpiPm {
    type State = AcpiPmState;
    type Args = Arc<dyn VmRequests>;
    type Error = RestoreError;

    fn save(&self) -> AcpiPmState {
        self.save_at(Instant::now())
    }

    fn restore(args: Self::Args, state: &AcpiPmState) -> Result<Self, RestoreError> {
        Self::restore_at(args, state, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RequestRecorder;

    const BASE: PioAddress = PioAddress(PM_BASE);

    fn device() -> (AcpiPm, Arc<RequestRecorder>) {
        let rec = Arc::new(RequestRecorder::default());
        (AcpiPm::new(rec.clone()), rec)
    }

    fn rd16(pm: &mut AcpiPm, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        pm.pio_read(BASE, offset, &mut b);
        u16::from_le_bytes(b)
    }

    fn wr16(pm: &mut AcpiPm, offset: u16, value: u16) {
        pm.pio_write(BASE, offset, &value.to_le_bytes());
    }

    fn slp(typ: u16) -> u16 {
        (typ << PM1_CNT_SLP_TYP_SHIFT) | PM1_CNT_SLP_EN
    }

    #[test]
    fn s3_requests_suspend_and_reports_the_wake() {
        let (mut pm, rec) = device();
        wr16(&mut pm, 2, PM1_EN_RTC);
        wr16(&mut pm, 4, slp(S3_SLP_TYP as u16));
        assert_eq!(rec.take(), vec![VmRequest::Suspend]);
        assert_eq!(rd16(&mut pm, 0), PM1_STS_WAK | PM1_STS_RTC);
        wr16(&mut pm, 0, PM1_STS_WAK | PM1_STS_RTC);
        assert_eq!(rd16(&mut pm, 0), 0);
    }

    #[test]
    fn sci_en_always_reads_set() {
        let (mut pm, _) = device();
        assert_eq!(rd16(&mut pm, PM1_CNT_OFFSET), PM1_CNT_SCI_EN);
        wr16(&mut pm, PM1_CNT_OFFSET, 0);
        assert_eq!(rd16(&mut pm, PM1_CNT_OFFSET), PM1_CNT_SCI_EN);
    }

    #[test]
    fn s5_powers_off_other_sleep_types_latch() {
        let (mut pm, rec) = device();
        // ACPICA writes SLP_TYP first, then SLP_TYP with SLP_EN.
        wr16(&mut pm, PM1_CNT_OFFSET, 3 << PM1_CNT_SLP_TYP_SHIFT);
        assert!(rec.take().is_empty());
        wr16(&mut pm, PM1_CNT_OFFSET, slp(3));
        assert!(rec.take().is_empty());
        // SLP_TYP is latched, SLP_EN reads as 0.
        assert_eq!(
            rd16(&mut pm, PM1_CNT_OFFSET),
            (3 << PM1_CNT_SLP_TYP_SHIFT) | PM1_CNT_SCI_EN
        );
        wr16(&mut pm, PM1_CNT_OFFSET, slp(u16::from(S5_SLP_TYP)));
        assert_eq!(rec.take(), vec![VmRequest::PowerOff]);
    }

    #[test]
    fn s5_by_byte_writes() {
        let (mut pm, rec) = device();
        let value = slp(u16::from(S5_SLP_TYP)).to_le_bytes();
        pm.pio_write(BASE, PM1_CNT_OFFSET, &[value[0]]);
        assert!(rec.take().is_empty());
        pm.pio_write(BASE, PM1_CNT_OFFSET + 1, &[value[1]]);
        assert_eq!(rec.take(), vec![VmRequest::PowerOff]);
    }

    #[test]
    fn pm1_sts_is_write_one_to_clear_and_pm1_en_is_rw() {
        let (mut pm, _) = device();
        pm.pm1_sts = 0x8101;
        wr16(&mut pm, 0, 0x0001);
        assert_eq!(rd16(&mut pm, 0), 0x8100);
        wr16(&mut pm, 0, 0x0000);
        assert_eq!(rd16(&mut pm, 0), 0x8100);
        // One 32-bit write covers PM1_STS and PM1_EN.
        pm.pio_write(BASE, 0, &0x0120_8000u32.to_le_bytes());
        assert_eq!(rd16(&mut pm, 0), 0x0100);
        assert_eq!(rd16(&mut pm, 2), 0x0120);
    }

    #[test]
    fn timer_is_read_only_and_reserved_bytes_read_all_ones() {
        let (mut pm, rec) = device();
        pm.pio_write(BASE, PM_TMR_OFFSET, &[0xff; 4]);
        let mut b = [0u8; 4];
        pm.pio_read(BASE, PM_TMR_OFFSET, &mut b);
        assert_eq!(b[3], 0);
        assert!(u32::from_le_bytes(b) < 0x00ff_0000);
        assert_eq!(rd16(&mut pm, 6), 0xffff);
        assert_eq!(rd16(&mut pm, 12), 0xffff);
        assert_eq!(rd16(&mut pm, 0xffff), 0xffff);
        // Below the block (a base the VMM would never use) reads all-ones.
        let mut low = [0u8; 2];
        pm.pio_read(PioAddress(0x10), 0, &mut low);
        assert_eq!(low, [0xff, 0xff]);
        // Per-block registration decodes the same as one range.
        wr16(&mut pm, 2, 0x0101);
        assert_eq!(
            {
                let mut b = [0u8; 2];
                pm.pio_read(PioAddress(PM_BASE + 2), 0, &mut b);
                u16::from_le_bytes(b)
            },
            0x0101
        );
        for offset in [0u16, 5, 6, 7, 11, 15, 16, 0xfffe, 0xffff] {
            for width in 0..=8usize {
                let mut buf = vec![0u8; width];
                pm.pio_read(BASE, offset, &mut buf);
                pm.pio_write(BASE, offset, &vec![0u8; width]);
            }
        }
        assert!(rec.take().is_empty());
    }

    #[test]
    fn timer_counts_at_pm_frequency_and_wraps_in_24_bits() {
        assert_eq!(pm_timer_value(0, Duration::ZERO), 0);
        assert_eq!(pm_timer_value(0, Duration::from_secs(1)), 3_579_545);
        assert_eq!(pm_timer_value(0, Duration::from_millis(1)), 3_579);
        // 2^24 ticks take about 4.687 s.
        let wrap = Duration::from_nanos(16_777_216u64 * 1_000_000_000 / PM_TIMER_FREQ_HZ + 1);
        assert!(pm_timer_value(0, wrap) < 4);
        assert_eq!(pm_timer_value(0x00ff_fff0, Duration::from_micros(10)), 0x13);
        // Long uptimes neither overflow nor exceed 24 bits.
        let long = pm_timer_value(0, Duration::from_secs(400 * 24 * 3600));
        assert_eq!(long & !PM_TMR_MASK, 0);

        let (pm, _) = device();
        let t0 = pm.timer_base;
        let a = pm.timer_at(t0 + Duration::from_millis(10));
        let b = pm.timer_at(t0 + Duration::from_millis(20));
        assert!(b > a);
        assert_eq!(b - a, 35_795);
        // A clock reading before the base does not underflow.
        assert_eq!(pm.timer_at(t0), 0);
    }

    #[test]
    fn timer_advances_on_real_reads() {
        let (mut pm, _) = device();
        let mut b = [0u8; 4];
        pm.pio_read(BASE, PM_TMR_OFFSET, &mut b);
        let first = u32::from_le_bytes(b);
        std::thread::sleep(Duration::from_millis(2));
        pm.pio_read(BASE, PM_TMR_OFFSET, &mut b);
        let second = u32::from_le_bytes(b);
        assert!(second.wrapping_sub(first) & PM_TMR_MASK >= 7_000);
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut pm, _) = device();
        pm.pm1_sts = 0x0100;
        wr16(&mut pm, 2, 0x0020);
        wr16(&mut pm, PM1_CNT_OFFSET, 5 << PM1_CNT_SLP_TYP_SHIFT);
        let t0 = pm.timer_base;
        let saved_at = t0 + Duration::from_secs(3);
        let state = pm.save_at(saved_at);
        assert_eq!(state.pm_tmr, pm_timer_value(0, Duration::from_secs(3)));

        let rec = Arc::new(RequestRecorder::default());
        let restored_at = t0 + Duration::from_secs(100);
        let mut restored = AcpiPm::restore_at(rec.clone(), &state, restored_at).expect("restore");
        assert_eq!(restored.save_at(restored_at), state);
        // The timer counts on from the saved value, not from host time.
        assert_eq!(
            restored.timer_at(restored_at + Duration::from_secs(1)),
            pm.timer_at(saved_at + Duration::from_secs(1))
        );
        for offset in [0u16, 2, PM1_CNT_OFFSET, 6] {
            assert_eq!(rd16(&mut restored, offset), rd16(&mut pm, offset));
        }
        wr16(&mut restored, PM1_CNT_OFFSET, slp(u16::from(S5_SLP_TYP)));
        assert_eq!(rec.take(), vec![VmRequest::PowerOff]);
    }

    #[test]
    fn restore_rejects_timer_beyond_24_bits() {
        let (pm, _) = device();
        let mut state = pm.save();
        state.pm_tmr = 0x0100_0000;
        assert!(matches!(
            AcpiPm::restore(Arc::new(RequestRecorder::default()), &state),
            Err(RestoreError::Invalid { .. })
        ));
    }
}
