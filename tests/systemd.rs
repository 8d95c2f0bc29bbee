//! The Debian package and its units under a real systemd (booted as PID 1
//! of a PID + mount namespace, see common/systemd.rs), with the users of a
//! real host: the service user `cronpost`, a producer and an admin in its
//! group, root, and a user outside it. A receiver on 127.0.0.1 (the
//! namespace shares the network) gets the deliveries.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::systemd::{Systemd, package};
use common::*;

const CONFIG: &str = "/etc/cronpost/cronpost.toml";
const DB: &str = "/var/lib/cronpost/cronpost.db";
const METRICS_DIR: &str = "/var/lib/prometheus/node-exporter";

/// The package's example config with its example endpoint replaced by
/// `endpoints` and `extra` top-level lines, written as an admin would:
/// in place, so it keeps the package's mode and group.
fn configure(systemd: &Systemd, extra: &str, run: &str, endpoints: &str) {
    let example = std::fs::read_to_string(systemd.path(CONFIG)).unwrap();
    let head = example.split("[run]").next().unwrap();
    systemd.write(
        CONFIG,
        &format!("{extra}\n{head}[run]\n{run}\n\n{endpoints}"),
    );
}

/// (owner, group, mode) of a file inside the namespace.
fn owner(systemd: &Systemd, inside: &str) -> (String, String, u32) {
    let out = systemd.ok(&format!("stat -c '%U %G %a' {inside}"));
    let mut fields = out.split_whitespace();
    let (user, group) = (fields.next().unwrap(), fields.next().unwrap());
    let mode = u32::from_str_radix(fields.next().unwrap(), 8).unwrap();
    (user.to_string(), group.to_string(), mode)
}

fn wait_for_journal(systemd: &Systemd, unit: &str, text: &str) {
    wait_until(
        Duration::from_secs(60),
        &format!("{unit} logs {text:?}"),
        || systemd.journal(unit).contains(text),
    );
}

#[test]
fn the_package_holds_the_binary_units_sysusers_tmpfiles_and_a_private_config() {
    let deb = package();
    let contents = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(deb)
        .output()
        .unwrap();
    assert!(contents.status.success());
    let listing: HashMap<String, String> = String::from_utf8_lossy(&contents.stdout)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (
                fields[5].trim_start_matches('.').to_string(),
                format!("{} {}", fields[0], fields[1]),
            )
        })
        .collect();
    for (path, mode) in [
        ("/usr/bin/cronpost", "-rwxr-xr-x 0/0"),
        ("/usr/lib/systemd/system/cronpost.service", "-rw-r--r-- 0/0"),
        ("/usr/lib/systemd/system/cronpost.timer", "-rw-r--r-- 0/0"),
        (
            "/usr/lib/systemd/system/cronpost-daemon.service",
            "-rw-r--r-- 0/0",
        ),
        ("/usr/lib/sysusers.d/cronpost.conf", "-rw-r--r-- 0/0"),
        ("/usr/lib/tmpfiles.d/cronpost.conf", "-rw-r--r-- 0/0"),
        // 0640 in the archive; postinst gives it group cronpost.
        ("/etc/cronpost/cronpost.toml", "-rw-r----- 0/0"),
        (
            "/usr/share/doc/cronpost/cronpost.example.toml",
            "-rw-r--r-- 0/0",
        ),
        ("/usr/share/doc/cronpost/README.md", "-rw-r--r-- 0/0"),
    ] {
        assert_eq!(listing.get(path).map(String::as_str), Some(mode), "{path}");
    }
    assert!(
        !listing.keys().any(|p| p.ends_with("cronpost-daemon.timer")),
        "no invented units: {listing:?}"
    );

    let info = Command::new("dpkg-deb")
        .arg("--info")
        .arg(deb)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("Package: cronpost"), "{info}");
    assert!(
        info.contains("Depends: ") && info.contains("systemd"),
        "{info}"
    );

    let scripts = tempfile::tempdir().unwrap();
    let control = scripts.path().join("DEBIAN");
    assert!(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(deb)
            .arg(&control)
            .status()
            .unwrap()
            .success()
    );
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), CONFIG);
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    for needed in [
        "systemd-sysusers",
        "systemd-tmpfiles --create cronpost.conf",
        "chown root:cronpost /etc/cronpost/cronpost.toml",
        "chmod 0640 /etc/cronpost/cronpost.toml",
    ] {
        assert!(
            postinst.contains(needed),
            "postinst lacks {needed:?}:\n{postinst}"
        );
    }
    // Installing enables and starts nothing: enabling happens only for a
    // unit the admin had enabled before (an upgrade), starting never.
    for never in [
        "deb-systemd-invoke start",
        "systemctl enable",
        "systemctl start",
    ] {
        assert!(
            !postinst.contains(never),
            "postinst runs {never:?}:\n{postinst}"
        );
    }
    let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
    assert!(prerm.contains("deb-systemd-invoke stop"), "{prerm}");
    for script in ["postinst", "prerm", "postrm"] {
        let sh = Command::new("sh")
            .arg("-n")
            .arg(control.join(script))
            .status()
            .unwrap();
        assert!(sh.success(), "{script} is valid sh");
    }
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    // verify checks that ExecStart's binary exists: point it at ours.
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let names = [
        "cronpost.service",
        "cronpost.timer",
        "cronpost-daemon.service",
    ];
    for name in names {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        std::fs::write(
            dir.path().join(name),
            text.replace("/usr/bin/cronpost", env!("CARGO_BIN_EXE_cronpost")),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(names)
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze is installed (.ci/test installs it)");
    let complaints = stderr(&out);
    assert!(out.status.success(), "{complaints}");
    assert!(
        !complaints.contains("cronpost"),
        "warnings about our units: {complaints}"
    );
}

#[test]
fn the_timer_delivers_what_root_a_producer_and_plain_sql_enqueued_and_admins_share_the_queue() {
    let rx = Receiver::start();
    let systemd = Systemd::boot();
    systemd.install_package();

    // What the package made: a system user, a setgid state directory, a
    // config for the service's group only, and nothing enabled or running.
    systemd.ok("getent passwd cronpost && getent group cronpost");
    assert_eq!(
        owner(&systemd, "/var/lib/cronpost"),
        ("cronpost".into(), "cronpost".into(), 0o2770)
    );
    assert_eq!(
        owner(&systemd, CONFIG),
        ("root".into(), "cronpost".into(), 0o640)
    );
    for (unit, state) in [
        ("cronpost.timer", "disabled"),
        ("cronpost.service", "static"),
        ("cronpost-daemon.service", "disabled"),
    ] {
        assert_eq!(systemd.property(unit, "UnitFileState"), state, "{unit}");
        assert_eq!(systemd.property(unit, "ActiveState"), "inactive", "{unit}");
    }

    // The admin's steps (README "Running it under systemd"): a metrics
    // directory cronpost may write, the config, producers in the group.
    systemd.ok(&format!("install -d -g cronpost -m 2775 {METRICS_DIR}"));
    configure(
        &systemd,
        &format!("metrics_file = \"{METRICS_DIR}/cronpost.prom\""),
        // The unit's run lingers up to max_runtime: short here, so its
        // summary comes soon.
        "max_children = 2\nmax_runtime = \"2s\"",
        &endpoint("hook", &rx.url("/hook"), &["customer.updated"], ""),
    );
    systemd.ok("cronpost check-config");
    systemd.ok(
        "useradd --system --no-create-home producer && usermod -aG cronpost producer
         useradd --system --no-create-home admin && usermod -aG cronpost admin
         useradd --system --no-create-home outsider",
    );

    // Before any run: root enqueues (and so creates the database), then
    // the producer, with the CLI and with plain SQL.
    let enqueue = "cronpost enqueue --topic customer.updated";
    systemd.ok(&format!(
        "{enqueue} --account root --data '{{\"by\":\"root\"}}'"
    ));
    assert_eq!(
        owner(&systemd, DB),
        ("root".into(), "cronpost".into(), 0o660)
    );
    systemd.ok(&format!(
        "runuser -u producer -- {enqueue} --account producer --data '{{\"by\":\"producer\"}}'"
    ));
    systemd.ok(&format!(
        "runuser -u producer -- sqlite3 {DB} \"INSERT INTO messages (topic, account, payload) VALUES ('customer.updated', 'sql', '{{\\\"by\\\":\\\"sql\\\"}}')\""
    ));
    // Outside the group: not even the config (it holds the secrets).
    let out = systemd.sh(&format!(
        "runuser -u outsider -- {enqueue} --account x --data '{{}}'"
    ));
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );

    systemd.ok("systemctl enable --now cronpost.timer");
    wait_until(Duration::from_secs(60), "the three messages arrive", || {
        rx.received_on("/hook").len() >= 3
    });
    let mut senders: Vec<String> = rx
        .received_on("/hook")
        .iter()
        .map(|r| r.header("cronpost-account").to_string())
        .collect();
    senders.sort();
    assert_eq!(senders, ["producer", "root", "sql"]);

    // journald holds the one-line run summaries, without their own stamps.
    wait_for_journal(&systemd, "cronpost.service", "routed 3 messages");
    let journal = systemd.journal("cronpost.service");
    let summary = journal
        .lines()
        .find(|l| l.contains("routed 3 messages"))
        .unwrap();
    assert!(
        summary.contains(": 3 delivered, 0 retried, 0 dead, 0 failed"),
        "{summary}"
    );
    assert!(!journal.contains("Permission denied"), "{journal}");
    assert_eq!(systemd.property("cronpost.service", "Result"), "success");

    // The metrics file: written by the service, readable by anyone (node_exporter).
    let metrics = format!("{METRICS_DIR}/cronpost.prom");
    wait_until(Duration::from_secs(30), "metrics written", || {
        systemd.path(&metrics).exists()
    });
    assert_eq!(
        owner(&systemd, &metrics),
        ("cronpost".into(), "cronpost".into(), 0o644)
    );
    let read = systemd.ok(&format!("runuser -u outsider -- cat {metrics}"));
    assert!(read.contains("cronpost_runs_total"), "{read}");

    // An admin in the group runs the README's queries and `cronpost stats`.
    for query in readme_queries() {
        let quoted = query.replace('\'', "'\\''");
        systemd.ok(&format!(
            "runuser -u admin -- sqlite3 -header -column {DB} '{quoted}'"
        ));
    }
    let stats = systemd.ok("runuser -u admin -- cronpost stats");
    assert!(stats.contains("hook"), "{stats}");

    // Whoever made them, every file beside the database is group cronpost
    // and group read-write, none world-accessible.
    let files = systemd.ok("find /var/lib/cronpost -mindepth 1 -printf '%p %u %g %m\\n'");
    for line in files.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let mode = u32::from_str_radix(fields[3], 8).unwrap();
        assert_eq!(fields[2], "cronpost", "{line}");
        assert_eq!(mode & 0o060, 0o060, "group read-write: {line}");
        assert_eq!(mode & 0o007, 0, "nothing for others: {line}");
    }
    // The database's files are readable through /proc/PID/root too.
    let db = systemd.path(DB);
    assert_eq!(std::fs::metadata(&db).unwrap().mode() & 0o777, 0o660);
}

#[test]
fn the_daemon_is_ready_when_started_keeps_its_config_on_a_bad_reload_and_stops_within_its_grace() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Hang);
    let systemd = Systemd::boot();
    systemd.install_package();
    // A short watchdog, so a missed beat would show within this test.
    systemd.ok(
        "mkdir -p /etc/systemd/system/cronpost-daemon.service.d
         printf '[Service]\\nWatchdogSec=3s\\n' > /etc/systemd/system/cronpost-daemon.service.d/watchdog.conf
         systemctl daemon-reload",
    );
    let endpoints = endpoint("hook", &rx.url("/hook"), &["t"], "")
        + &endpoint(
            "slow",
            &rx.url("/slow"),
            &["slow"],
            "mode = \"confirm\"\ntimeout = \"20s\"",
        );
    configure(
        &systemd,
        "",
        "stop_grace = \"2s\"\nchild_deadline = \"25s\"\nlease_timeout = \"40s\"",
        &endpoints,
    );
    systemd.ok(&format!(
        "sed -i 's|^schedule = .*|schedule = \"* * * * * *\"|' {CONFIG}"
    ));
    let good = std::fs::read_to_string(systemd.path(CONFIG)).unwrap();

    // Type=notify: `systemctl start` returns once the daemon said READY.
    systemd.ok("systemctl start cronpost-daemon.service");
    assert_eq!(
        systemd.property("cronpost-daemon.service", "ActiveState"),
        "active"
    );
    let status = systemd.property("cronpost-daemon.service", "StatusText");
    assert!(
        status == "first run starting" || status.starts_with("run "),
        "{status}"
    );
    systemd.ok("cronpost enqueue --topic t --account acme --data '{\"n\":1}'");
    wait_until(Duration::from_secs(60), "the daemon delivers", || {
        rx.received_on("/hook").len() == 1
    });

    // A bad config on reload: rejected, the old one kept.
    systemd.write(CONFIG, &good.replace("[run]", "[run]\nmax_childs = 1"));
    systemd.ok("systemctl reload cronpost-daemon.service");
    wait_for_journal(
        &systemd,
        "cronpost-daemon.service",
        "keeping the old config",
    );
    assert_eq!(
        systemd.property("cronpost-daemon.service", "ActiveState"),
        "active"
    );
    // The CLI cannot read the bad file; a plain-SQL producer can publish.
    systemd.ok(&format!(
        "sqlite3 {DB} \"INSERT INTO messages (topic, account, payload) VALUES ('t', 'acme', '{{}}')\""
    ));
    wait_until(Duration::from_secs(60), "the old config delivers", || {
        rx.received_on("/hook").len() == 2
    });
    systemd.write(CONFIG, &good);

    // Three children hang on a slow receiver when the stop comes: they get
    // the grace period, are killed, and their deliveries are retried later.
    for n in 0..3 {
        systemd.ok(&format!(
            "cronpost enqueue --topic slow --account acme --data '{{\"n\":{n}}}'"
        ));
    }
    wait_until(Duration::from_secs(60), "three children posting", || {
        rx.received_on("/slow").len() == 3
    });
    let stopping = Instant::now();
    systemd.ok("systemctl stop cronpost-daemon.service");
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(2 + 10), "stop took {took:?}");
    assert_eq!(
        systemd.property("cronpost-daemon.service", "ActiveState"),
        "inactive"
    );
    assert_eq!(
        systemd.property("cronpost-daemon.service", "Result"),
        "success"
    );
    assert_eq!(
        systemd.property("cronpost-daemon.service", "NRestarts"),
        "0"
    );
    let journal = systemd.journal("cronpost-daemon.service");
    assert!(journal.contains("stop requested"), "{journal}");
    assert!(
        !journal.to_lowercase().contains("watchdog timeout"),
        "{journal}"
    );
    let leased = systemd.ok(&format!(
        "sqlite3 {DB} \"SELECT count(*) FROM deliveries WHERE state = 'leased'\""
    ));
    assert_eq!(
        leased.trim(),
        "0",
        "the killed children's leases were settled"
    );

    rx.set_default("/slow", Reply::Status(200));
    systemd.ok("systemctl start cronpost-daemon.service");
    wait_until(
        Duration::from_secs(90),
        "the stopped deliveries arrive",
        || {
            let ids: std::collections::HashSet<String> = rx
                .received_on("/slow")
                .iter()
                .filter(|r| r.status == Some(200))
                .map(|r| r.header("webhook-id").to_string())
                .collect();
            ids.len() == 3
        },
    );
    systemd.ok("systemctl stop cronpost-daemon.service");
}
