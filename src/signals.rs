//! Signals of the parent process, handled the fork-safe way: signal-hook
//! handlers only set flags and write a byte to a self-pipe (no signal
//! thread, nothing in the handler but async-signal-safe writes). The parent
//! sleeps in poll(2) on the pipe, so SIGCHLD, SIGTERM, SIGINT and SIGHUP
//! each wake it at once.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigHandler, Signal, signal};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};

use crate::error::{Error, Result};

/// The installed handlers. They stay installed for the life of the process
/// (signal-hook cannot restore a default disposition), so install them once.
pub struct Signals {
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
}

impl Signals {
    /// Installs the handlers: SIGTERM and SIGINT ask to stop, SIGHUP to
    /// reload, SIGCHLD only wakes.
    pub fn install() -> Result<Signals> {
        let fail = |e| Error::io("cannot install signal handlers", e);
        let (wake, write_end) = UnixStream::pair().map_err(fail)?;
        wake.set_nonblocking(true).map_err(fail)?;
        write_end.set_nonblocking(true).map_err(fail)?;
        let stop = Arc::new(AtomicBool::new(false));
        let reload = Arc::new(AtomicBool::new(false));
        // Flags first, so a woken parent always finds the flag set.
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register(signal, stop.clone()).map_err(fail)?;
        }
        signal_hook::flag::register(SIGHUP, reload.clone()).map_err(fail)?;
        for signal in [SIGCHLD, SIGTERM, SIGINT, SIGHUP] {
            let pipe = write_end.try_clone().map_err(fail)?;
            signal_hook::low_level::pipe::register(signal, pipe).map_err(fail)?;
        }
        Ok(Signals { wake, stop, reload })
    }

    /// Whether SIGTERM or SIGINT came.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Whether SIGHUP came since the last call.
    pub fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::SeqCst)
    }

    /// Whether SIGHUP came and is still to be taken (see `take_reload`).
    pub fn reload_requested(&self) -> bool {
        self.reload.load(Ordering::SeqCst)
    }

    /// Sleeps until a signal comes or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        self.wait_or(timeout, None);
    }

    /// Sleeps until a signal comes, `also` is readable, or `timeout` passes.
    pub fn wait_or(&self, timeout: Duration, also: Option<BorrowedFd>) {
        let timeout =
            PollTimeout::try_from(timeout.as_millis() as u64 + 1).unwrap_or(PollTimeout::MAX);
        let mut fds = vec![PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        fds.extend(also.map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
        let _ = poll(&mut fds, timeout);
        let mut buf = [0u8; 256];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Puts the signals [`Signals::install`] handles back to their default
/// dispositions, in a forked process that must not run the parent's
/// handlers (see `forking`).
pub fn reset_to_defaults() {
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        // SAFETY: setting SIG_DFL installs no Rust code as a handler.
        unsafe {
            let _ = signal(sig, SigHandler::SigDfl);
        }
    }
}
