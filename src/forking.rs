//! What every process the dispatcher forks does first. It starts as a copy
//! of a single-threaded parent that holds no database connection, HTTP
//! client or lock (ARCHITECTURE.md), but it inherited the parent's signal
//! handlers and its random number generator's state, and a child must not
//! outlive its deadline even when the parent is gone.

use std::time::Duration;

/// Resets what a forked process must not share with its parent: signal
/// dispositions back to the defaults, and a fresh seed for the thread RNG
/// (else every child draws the same backoff jitter). With `lifetime`, the
/// process also bounds its own life: SIGALRM (default action: terminate)
/// after `lifetime`, whatever happens to the parent that would otherwise
/// kill it at its deadline. The timer counts on the monotonic clock, so a
/// wall-clock jump does not move it.
pub fn after_fork(lifetime: Option<Duration>) {
    crate::signals::reset_to_defaults();
    if let Err(e) = rand::rng().reseed() {
        log::warn!("cannot reseed the random number generator after fork: {e}");
    }
    if let Some(lifetime) = lifetime {
        set_alarm(lifetime);
    }
}

/// SIGALRM after `after`, to the millisecond (alarm(2) counts whole
/// seconds, which could outlast a tight lease margin).
fn set_alarm(after: Duration) {
    let after = after.max(Duration::from_millis(1));
    let timer = nix::libc::itimerval {
        it_interval: nix::libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: nix::libc::timeval {
            tv_sec: after.as_secs() as nix::libc::time_t,
            tv_usec: nix::libc::suseconds_t::from(after.subsec_micros()),
        },
    };
    // SAFETY: setitimer reads `timer`; no old value is asked for.
    let set = unsafe { nix::libc::setitimer(nix::libc::ITIMER_REAL, &timer, std::ptr::null_mut()) };
    if set != 0 {
        log::warn!(
            "cannot set this child's alarm: {}",
            std::io::Error::last_os_error()
        );
    }
}
