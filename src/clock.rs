//! The two clocks a lease is timed by. The wall clock (Unix epoch ms) is
//! what the schema stores and admins read, but an NTP step or an admin's
//! `date -s` can move it by any amount. The boot clock (CLOCK_BOOTTIME,
//! with the kernel's boot id) only moves forward, across suspend too, and
//! is the same for every process of one boot. A lease records both; on the
//! same boot the boot clock decides when it expires (ARCHITECTURE.md).

/// A reading of the boot clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootTime {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// Milliseconds since that boot (CLOCK_BOOTTIME).
    pub ms: i64,
}

/// The boot id of the running kernel; None where there is none to read.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty())
}

/// The boot clock now, for the boot `boot_id` (read once per process: it
/// does not change until the next boot).
pub fn boot_time(boot_id: &str) -> Option<BootTime> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some(BootTime {
        boot_id: boot_id.to_string(),
        ms: now.tv_sec() * 1000 + now.tv_nsec() / 1_000_000,
    })
}
