//! MC146818 real-time clock and CMOS RAM at ports 0x70 (index) and 0x71
//! (data).
//!
//! The time registers follow the host's wall clock (UTC) plus an offset the
//! guest sets by writing them. Register A's update-in-progress bit is set
//! during the last 244 us of every second, as on the real part, and also on
//! the first read of A after an update the guest did not see: guests
//! synchronise with the update by waiting for that bit to rise and fall, and
//! a vCPU that is descheduled or slow to exit can miss a 244 us window every
//! time. The periodic and update interrupts are not generated; the alarm
//! flag is reported in register C when the alarm matches.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{fill_all_ones, Persist, RestoreError};

pub const RTC_INDEX_PORT: u16 = 0x70;
pub const RTC_PORT_COUNT: u16 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// Century, where PC firmware keeps it (the FADT's CENTURY field).
pub const REG_CENTURY: u8 = 0x32;

const REG_A_UIP: u8 = 0x80;
/// Register A at power-on: 32.768 kHz time base, 1024 Hz rate.
const REG_A_DEFAULT: u8 = 0x26;
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
const REG_B_SET: u8 = 0x80;
const REG_C_AF: u8 = 0x20;
/// Register D: valid RAM and time.
const REG_D_VRT: u8 = 0x80;
/// An alarm byte with its two top bits set matches any value.
const ALARM_DONT_CARE: u8 = 0xc0;
/// How long before each second's update the UIP bit is set.
const UIP_NANOS: u32 = 244_000;

const CMOS_SIZE: usize = 128;

/// The calendar fields of one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    sec: u8,
    min: u8,
    hour: u8,
    weekday: u8,
    day: u8,
    month: u8,
    year: u32,
}

/// Civil date of a count of days since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (u32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as u32, m, d)
}

fn datetime(unix_secs: i64) -> DateTime {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    DateTime {
        sec: (secs % 60) as u8,
        min: (secs / 60 % 60) as u8,
        hour: (secs / 3600) as u8,
        // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
        weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        day,
        month,
        year,
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The RTC and its CMOS RAM.
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    cmos: [u8; CMOS_SIZE],
    /// Seconds added to the host clock: what the guest set minus host time.
    offset_secs: i64,
    /// Host second whose starting update a read of register A has shown.
    update_shown: i64,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    pub fn new() -> Self {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[REG_A as usize] = REG_A_DEFAULT;
        cmos[REG_B as usize] = REG_B_24H;
        cmos[REG_D as usize] = REG_D_VRT;
        Rtc {
            index: 0,
            cmos,
            offset_secs: 0,
            update_shown: Self::now().0,
        }
    }

    /// Set a CMOS RAM byte at start-up (firmware's memory size fields and
    /// the like); indexes beyond the RAM are ignored.
    pub fn set_cmos(&mut self, index: u8, value: u8) {
        if let Some(b) = self.cmos.get_mut(index as usize) {
            *b = value;
        }
    }

    fn now() -> (i64, u32) {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (d.as_secs() as i64, d.subsec_nanos())
    }

    fn encode(&self, v: u8) -> u8 {
        if self.cmos[REG_B as usize] & REG_B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.cmos[REG_B as usize] & REG_B_BINARY != 0 {
            v
        } else {
            (v >> 4) * 10 + (v & 0xf)
        }
    }

    fn hour_reg(&self, hour: u8) -> u8 {
        if self.cmos[REG_B as usize] & REG_B_24H != 0 {
            self.encode(hour)
        } else {
            let h12 = match hour % 12 {
                0 => 12,
                h => h,
            };
            self.encode(h12) | if hour >= 12 { 0x80 } else { 0 }
        }
    }

    fn alarm_matches(&self, t: &DateTime) -> bool {
        let m = |alarm: u8, current: u8| {
            let a = self.cmos[alarm as usize];
            a & ALARM_DONT_CARE == ALARM_DONT_CARE || a == current
        };
        m(REG_SECONDS_ALARM, self.encode(t.sec))
            && m(REG_MINUTES_ALARM, self.encode(t.min))
            && m(REG_HOURS_ALARM, self.hour_reg(t.hour))
    }

    fn read_reg(&mut self, reg: u8, host_secs: i64, nanos: u32) -> u8 {
        let t = datetime(host_secs + self.offset_secs);
        // A guest that reads the time has seen the updates before it: none
        // of those is a missed update to show in UIP any more.
        if matches!(
            reg,
            REG_SECONDS
                | REG_MINUTES
                | REG_HOURS
                | REG_WEEKDAY
                | REG_DAY
                | REG_MONTH
                | REG_YEAR
                | REG_CENTURY
        ) {
            self.update_shown = self.update_shown.max(host_secs);
        }
        match reg {
            REG_SECONDS => self.encode(t.sec),
            REG_MINUTES => self.encode(t.min),
            REG_HOURS => self.hour_reg(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((t.year % 100) as u8),
            REG_CENTURY => self.encode((t.year / 100) as u8),
            REG_A => {
                let set = self.cmos[REG_B as usize] & REG_B_SET != 0;
                let in_window = nanos >= 1_000_000_000 - UIP_NANOS;
                let missed = host_secs > self.update_shown;
                let uip = !set && (in_window || missed);
                if uip {
                    self.update_shown = if in_window { host_secs + 1 } else { host_secs };
                }
                (self.cmos[REG_A as usize] & !REG_A_UIP) | if uip { REG_A_UIP } else { 0 }
            }
            REG_C => {
                // Reading C acknowledges its flags.
                let flags = if self.alarm_matches(&t) { REG_C_AF } else { 0 };
                self.cmos[REG_C as usize] = 0;
                flags
            }
            r => self.cmos.get(r as usize).copied().unwrap_or(0xff),
        }
    }

    fn write_reg(&mut self, reg: u8, value: u8, host_secs: i64) {
        let t = datetime(host_secs + self.offset_secs);
        let field = |rtc: &Self, v: u8| i64::from(rtc.decode(v & 0x7f));
        // Setting a time field moves the offset by the difference.
        let delta = match reg {
            REG_SECONDS => Some(field(self, value) - i64::from(t.sec)),
            REG_MINUTES => Some((field(self, value) - i64::from(t.min)) * 60),
            REG_HOURS => Some((field(self, value) - i64::from(t.hour)) * 3600),
            REG_DAY => Some((field(self, value) - i64::from(t.day)) * 86_400),
            _ => None,
        };
        match (reg, delta) {
            (_, Some(d)) => self.offset_secs += d,
            // Month and year changes are rare; keep them approximate.
            (REG_MONTH, _) => {
                self.offset_secs += (field(self, value) - i64::from(t.month)) * 30 * 86_400
            }
            (REG_YEAR, _) => {
                self.offset_secs += (field(self, value) - i64::from(t.year % 100)) * 365 * 86_400
            }
            // C and D are read-only; the time base bits of A are kept.
            (REG_C | REG_D, _) => {}
            (REG_A, _) => self.cmos[REG_A as usize] = value & !REG_A_UIP,
            (r, _) => {
                if let Some(b) = self.cmos.get_mut(r as usize) {
                    *b = value;
                }
            }
        }
    }
}

impl MutDevicePio for Rtc {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let port = base.0.wrapping_add(offset);
        if data.len() != 1 || port != RTC_INDEX_PORT + 1 {
            fill_all_ones(data);
            return;
        }
        let (secs, nanos) = Self::now();
        data[0] = self.read_reg(self.index, secs, nanos);
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match base.0.wrapping_add(offset) {
            // Bit 7 of the index port gates NMIs on a PC; there are none to gate.
            RTC_INDEX_PORT => self.index = data[0] & 0x7f,
            p if p == RTC_INDEX_PORT + 1 => {
                let (secs, _) = Self::now();
                self.write_reg(self.index, data[0], secs)
            }
            _ => {}
        }
    }
}

/// Saved state of an [`Rtc`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RtcState {
    pub index: u8,
    pub cmos: Vec<u8>,
    pub offset_secs: i64,
}

impl Persist for Rtc {
    type State = RtcState;
    type Args = ();
    type Error = RestoreError;

    fn save(&self) -> RtcState {
        RtcState {
            index: self.index,
            cmos: self.cmos.to_vec(),
            offset_secs: self.offset_secs,
        }
    }

    fn restore(_: (), state: &RtcState) -> Result<Self, RestoreError> {
        let cmos: [u8; CMOS_SIZE] =
            state
                .cmos
                .as_slice()
                .try_into()
                .map_err(|_| RestoreError::Invalid {
                    device: "rtc",
                    reason: format!("CMOS has {} bytes, not {CMOS_SIZE}", state.cmos.len()),
                })?;
        Ok(Rtc {
            index: state.index & 0x7f,
            cmos,
            offset_secs: state.offset_secs,
            update_shown: Self::now().0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_is_right() {
        // 2026-11-21 19:30:05 UTC, a Saturday.
        let t = datetime(1_795_289_405);
        assert_eq!((t.year, t.month, t.day), (2026, 11, 21));
        assert_eq!((t.hour, t.min, t.sec), (19, 30, 5));
        assert_eq!(t.weekday, 7);
        assert_eq!(datetime(0).weekday, 5);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
    }

    #[test]
    fn bcd_and_binary_modes() {
        let mut rtc = Rtc::new();
        let secs = 1_795_289_405;
        assert_eq!(rtc.read_reg(REG_MINUTES, secs, 0), 0x30);
        assert_eq!(rtc.read_reg(REG_YEAR, secs, 0), 0x26);
        assert_eq!(rtc.read_reg(REG_CENTURY, secs, 0), 0x20);
        rtc.write_reg(REG_B, REG_B_24H | REG_B_BINARY, secs);
        assert_eq!(rtc.read_reg(REG_MINUTES, secs, 0), 30);
        rtc.write_reg(REG_B, 0, secs);
        assert_eq!(rtc.read_reg(REG_HOURS, secs, 0), 0x87);
    }

    #[test]
    fn uip_rises_just_before_the_second() {
        let mut rtc = Rtc::new();
        assert_eq!(rtc.read_reg(REG_A, 0, 0), REG_A_DEFAULT);
        assert_eq!(
            rtc.read_reg(REG_A, 0, 999_900_000),
            REG_A_DEFAULT | REG_A_UIP
        );
        // SET stops updates.
        rtc.write_reg(REG_B, REG_B_SET | REG_B_24H, 0);
        assert_eq!(rtc.read_reg(REG_A, 0, 999_900_000), REG_A_DEFAULT);
    }

    /// Read the seconds, then wait for an update cycle: the seconds have
    /// changed after it, however long the guest took to get there.
    #[test]
    fn an_update_cycle_after_reading_the_time_is_a_new_one() {
        let mut rtc = Rtc::new();
        let start = rtc.update_shown;
        // The guest first looks a few seconds after the RTC was made.
        let s0 = rtc.read_reg(REG_SECONDS, start + 3, 500_000_000);
        assert_eq!(rtc.read_reg(REG_A, start + 3, 600_000_000) & REG_A_UIP, 0);
        assert_ne!(rtc.read_reg(REG_A, start + 3, 999_900_000) & REG_A_UIP, 0);
        assert_eq!(rtc.read_reg(REG_A, start + 4, 1_000) & REG_A_UIP, 0);
        assert_ne!(rtc.read_reg(REG_SECONDS, start + 4, 2_000), s0);
        // Descheduled past the window: the missed update still shows once.
        assert_ne!(rtc.read_reg(REG_A, start + 6, 1_000) & REG_A_UIP, 0);
        assert_eq!(rtc.read_reg(REG_A, start + 6, 2_000) & REG_A_UIP, 0);
    }

    #[test]
    fn writing_time_moves_the_clock() {
        let mut rtc = Rtc::new();
        let secs = 1_795_289_405;
        rtc.write_reg(REG_HOURS, 0x20, secs);
        assert_eq!(rtc.read_reg(REG_HOURS, secs + 10, 0), 0x20);
        assert_eq!(rtc.read_reg(REG_MINUTES, secs + 10, 0), 0x30);
    }

    #[test]
    fn dont_care_alarm_flags_in_c_and_c_clears() {
        let mut rtc = Rtc::new();
        for r in [REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM] {
            rtc.write_reg(r, ALARM_DONT_CARE, 0);
        }
        assert_eq!(rtc.read_reg(REG_C, 0, 0), REG_C_AF);
        rtc.write_reg(REG_C, 0xff, 0);
        assert_eq!(rtc.read_reg(REG_D, 0, 0), REG_D_VRT);
    }

    #[test]
    fn ports_and_round_trip() {
        let mut rtc = Rtc::new();
        rtc.set_cmos(0x34, 0x07);
        rtc.pio_write(PioAddress(RTC_INDEX_PORT), 0, &[0x80 | 0x34]);
        let mut b = [0u8; 1];
        rtc.pio_read(PioAddress(RTC_INDEX_PORT), 1, &mut b);
        assert_eq!(b[0], 0x07);
        let mut w = [0u8; 2];
        rtc.pio_read(PioAddress(RTC_INDEX_PORT), 0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        rtc.pio_write(PioAddress(RTC_INDEX_PORT), 1, &[0x55]);
        let state = rtc.save();
        let mut back = Rtc::restore((), &state).unwrap();
        back.pio_read(PioAddress(RTC_INDEX_PORT), 1, &mut b);
        assert_eq!(b[0], 0x55);
        assert_eq!(back.save(), state);
        let bad = RtcState {
            cmos: vec![0; 3],
            ..state
        };
        assert!(Rtc::restore((), &bad).is_err());
    }
}
