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
/// after `lifetime`, rounded up to a second, whatever happens to the parent
/// that would otherwise kill it at its deadline. The alarm counts on the
/// monotonic clock, so a wall-clock jump does not move it.
pub fn after_fork(lifetime: Option<Duration>) {
    crate::signals::reset_to_defaults();
    if let Err(e) = rand::rng().reseed() {
        log::warn!("cannot reseed the random number generator after fork: {e}");
    }
    if let Some(lifetime) = lifetime {
        let seconds = lifetime.as_secs() + u64::from(lifetime.subsec_nanos() > 0);
        nix::unistd::alarm::set(u32::try_from(seconds.max(1)).unwrap_or(u32::MAX));
    }
}
