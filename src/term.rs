//! The host terminal while the guest owns the console: when stdin is a
//! terminal, keys go to the guest's serial port one by one, unechoed, as
//! with QEMU's `-serial stdio` (signals stay on, so Ctrl-C still ends
//! kvmrun). The saved settings come back on every way out: the guard's
//! drop, a panic, and SIGINT, SIGTERM, SIGHUP and SIGQUIT.

use std::sync::OnceLock;

/// The settings before raw mode, for the signal handler and panic hook.
static SAVED: OnceLock<libc::termios> = OnceLock::new();

const STDIN: libc::c_int = 0;
const SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Raw mode on stdin while it lives.
pub struct RawTerminal {
    saved: libc::termios,
}

fn restore_saved() {
    if let Some(t) = SAVED.get() {
        // SAFETY: tcsetattr only reads `t`; it is async-signal-safe.
        unsafe { libc::tcsetattr(STDIN, libc::TCSANOW, t) };
    }
}

extern "C" fn restore_and_reraise(sig: libc::c_int) {
    restore_saved();
    // SAFETY: signal() and raise() are async-signal-safe; the default
    // action then ends the process as the signal would have.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// The raw settings derived from `t`: no line editing, echo or input
/// translation; output processing and signals as they were.
pub fn raw_settings(t: &libc::termios) -> libc::termios {
    let mut r = *t;
    r.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    r.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
    r.c_cc[libc::VMIN] = 1;
    r.c_cc[libc::VTIME] = 0;
    r
}

impl RawTerminal {
    /// Put stdin in raw mode if it is a terminal; `None` otherwise.
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(STDIN) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write.
        if unsafe { libc::tcgetattr(STDIN, &mut saved) } != 0 {
            return None;
        }
        if SAVED.set(saved).is_ok() {
            for sig in SIGNALS {
                // SAFETY: the handler only calls async-signal-safe functions.
                unsafe {
                    libc::signal(
                        sig,
                        restore_and_reraise as extern "C" fn(libc::c_int) as libc::sighandler_t,
                    )
                };
            }
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_saved();
                previous(info);
            }));
        }
        let raw = raw_settings(&saved);
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(STDIN, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` is the valid termios read at entry.
        unsafe { libc::tcsetattr(STDIN, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_settings_keep_signals_and_output() {
        // SAFETY: plain data.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        t.c_lflag = libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN;
        t.c_iflag = libc::ICRNL | libc::IXON;
        t.c_oflag = libc::OPOST | libc::ONLCR;
        let r = raw_settings(&t);
        assert_eq!(r.c_lflag, libc::ISIG);
        assert_eq!(r.c_iflag, 0);
        assert_eq!(r.c_oflag, t.c_oflag);
        assert_eq!(r.c_cc[libc::VMIN], 1);
    }
}
