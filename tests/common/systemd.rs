//! A real systemd, booted as PID 1 of a new PID + mount namespace, with the
//! Debian package installed into it, so the units run for real: the user
//! and group from sysusers, the state directory from tmpfiles, hardening,
//! the timer, Type=notify, journald.
//!
//! Nothing outside the namespace changes: inside it, /etc, /usr and /var
//! are overlays whose upper layers live on a tmpfs (so dpkg, sysusers and
//! the database write there), /tmp, /run and /var/tmp are private tmpfs
//! mounts (without them systemd's boot-time cleanup would empty the host's
//! /tmp), it boots only basic.target (else it would start every service
//! enabled on the machine), and the units that would touch the kernel or
//! the host (sysctl, binfmt, modules, device nodes, timers) are masked. It
//! is stopped by its PID: SIGRTMIN+4 (poweroff), then SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Units masked inside the namespace: they would change the host (kernel
/// settings, binfmt, modules, /dev, remounts) or run jobs nobody asked for.
const MASKED: &[&str] = &[
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "systemd-remount-fs.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-update-utmp.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "logrotate.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
];

/// Runs inside the new namespaces: private mounts, then systemd as PID 1.
/// $1 is a scratch directory, covered by a tmpfs that holds the overlays'
/// upper layers.
const BOOT: &str = r#"
set -e
scratch=$1
shift
mount --make-rprivate /
mount -t tmpfs -o mode=0700 cronpost-test "$scratch"
for d in etc usr var; do
    mkdir -p "$scratch/upper/$d" "$scratch/work/$d"
    mount -t overlay overlay -o "lowerdir=/$d,upperdir=$scratch/upper/$d,workdir=$scratch/work/$d" "/$d"
done
for d in /tmp /run /var/tmp; do
    mount -t tmpfs -o mode=1777 cronpost-test "$d"
done
mkdir -p /etc/systemd/system
for unit in "$@"; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done
exec /lib/systemd/systemd --unit=basic.target --log-level=warning </dev/null
"#;

/// A booted systemd in its own namespaces.
pub struct Systemd {
    /// `unshare`, the parent of PID 1.
    unshare: Child,
    /// PID 1 of the namespace, as this process sees it.
    pid: i32,
    log: PathBuf,
    _scratch: tempfile::TempDir,
}

impl Systemd {
    /// Boots systemd and waits until it is running; fails with the reason
    /// when it cannot boot here (no silent skip).
    pub fn boot() -> Systemd {
        for tool in ["unshare", "nsenter", "runuser"] {
            assert!(
                Command::new(tool).arg("--version").output().is_ok(),
                "{tool} (util-linux) is needed to boot systemd in a namespace: run .ci/test"
            );
        }
        assert!(
            Path::new("/lib/systemd/systemd").exists(),
            "systemd is not installed: run .ci/test (apt-get install systemd)"
        );
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "booting systemd in a PID + mount namespace needs root"
        );
        let scratch = tempfile::tempdir().unwrap();
        let log = scratch.path().with_extension("systemd.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new("unshare");
        // If this test process dies without stopping it, unshare dies with
        // it (PDEATHSIG) and takes PID 1, so the whole namespace, along.
        // SAFETY: prctl is async-signal-safe and touches no memory.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL);
                Ok(())
            });
        }
        let unshare = command
            .args([
                "--pid",
                "--fork",
                "--kill-child=SIGKILL",
                "--mount",
                "--mount-proc",
            ])
            .args(["sh", "-c", BOOT, "sh"])
            .arg(scratch.path())
            .args(MASKED)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("unshare starts");
        let mut systemd = Systemd {
            pid: 0,
            unshare,
            log,
            _scratch: scratch,
        };
        systemd.wait_for_boot();
        systemd
    }

    fn wait_for_boot(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = self.unshare.try_wait() {
                panic!(
                    "systemd could not boot as PID 1 of a PID + mount namespace (unshare ended with {status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if self.pid == 0 {
                self.pid = super::children_of(self.unshare.id())
                    .into_iter()
                    .find(|&pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .is_ok_and(|c| c.trim() == "systemd")
                    })
                    .unwrap_or(0);
            }
            if self.pid != 0 {
                let state = self.sh("systemctl is-system-running 2>/dev/null || true");
                let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
                if state == "running" || state == "degraded" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not finish booting basic.target in 90s: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a shell script inside the namespaces, as root.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["--target", &self.pid.to_string(), "--mount", "--pid", "--"])
            .args(["sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("nsenter runs")
    }

    /// Runs a shell script inside, which must succeed; returns its stdout.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "inside systemd's namespace, `{script}` failed with {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A path inside the namespace, as this process can read it.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.pid))
    }

    /// Writes a file inside the namespace (through /proc/PID/root).
    pub fn write(&self, inside: &str, text: &str) {
        std::fs::write(self.path(inside), text).unwrap();
    }

    /// Installs the package into the namespace with dpkg.
    pub fn install_package(&self) {
        let deb = package();
        let inside = "/tmp/cronpost.deb";
        std::fs::copy(deb, self.path(inside)).unwrap();
        self.ok(&format!("dpkg -i {inside}"));
    }

    /// What journald holds of `unit`, message text only.
    pub fn journal(&self, unit: &str) -> String {
        self.ok(&format!("journalctl --no-pager -o cat -u {unit}"))
    }

    /// `systemctl show -p PROPERTY --value UNIT`.
    pub fn property(&self, unit: &str, property: &str) -> String {
        self.ok(&format!("systemctl show -p {property} --value {unit}"))
            .trim()
            .to_string()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        if self.pid != 0 {
            // SIGRTMIN+4: poweroff, the way a container manager stops it
            // (nix's Signal has no real-time signals).
            // SAFETY: kill(2) on a pid we started.
            unsafe {
                nix::libc::kill(self.pid, nix::libc::SIGRTMIN() + 4);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !matches!(self.unshare.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.pid != 0 {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        let _ = self.unshare.wait();
    }
}

/// The Debian package, built once per test process with cargo-deb (a
/// release build of the code under test).
pub fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let out_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/debian");
        let out = Command::new(&cargo)
            .args(["deb", "--manifest-path", manifest, "--output", out_dir])
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "cargo deb failed (is cargo-deb installed? run .ci/test): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .find(|l| l.ends_with(".deb"))
            .map(PathBuf::from)
            .expect("cargo deb prints the package's path");
        assert!(path.exists(), "{} exists", path.display());
        path
    })
}
