//! The daemon, signals, overlapping runs, metrics and the systemd units,
//! with the real binary, real children and a real receiver on 127.0.0.1.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running `cronpost daemon` whose stderr goes to a file we can poll.
struct Daemon {
    child: Child,
    log: std::path::PathBuf,
}

impl Daemon {
    fn start(env: &Env) -> Daemon {
        let log = env.path().join("daemon.log");
        let child = env
            .command(&["daemon"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let daemon = Daemon { child, log };
        daemon.wait_for_log("daemon started");
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&self, text: &str) {
        wait_until(Duration::from_secs(30), text, || self.log().contains(text));
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the exit; returns the exit code and how long it took.
    fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        wait_until(limit, "the daemon exits", || !self.is_running());
        (self.child.wait().unwrap().code(), started.elapsed())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_schedule(env: &Env, schedule: &str) {
    env.prepend_config(&format!("schedule = \"{schedule}\""));
}

#[test]
fn the_daemon_runs_every_second_and_delivers_what_is_enqueued_meanwhile() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("hook", &rx.url("/hook"), &["t"], ""));
    with_schedule(&env, "*/1 * * * * *");
    let mut daemon = Daemon::start(&env);

    for i in 0..3 {
        env.enqueue("t", "acme", &format!("{{\"n\":{i}}}"));
        wait_until(Duration::from_secs(30), "delivered by the daemon", || {
            rx.received_on("/hook").len() == i + 1
        });
    }
    wait_until(Duration::from_secs(30), "several runs", || {
        env.query_i64("SELECT count(*) FROM runs") >= 3
    });

    daemon.signal(Signal::SIGTERM);
    let (code, _) = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", daemon.log());
    assert!(daemon.log().contains("daemon stopping"));
}

#[test]
fn sigterm_lets_children_finish_within_the_grace_period_then_kills_them_and_loses_nothing() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Hang);
    let env = Env::new(
        "max_children = 3\nstop_grace = \"1s\"\nchild_deadline = \"20s\"\nlease_timeout = \"30s\"",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "mode = \"confirm\"\ntimeout = \"15s\"",
        ),
    );
    with_schedule(&env, "*/1 * * * * *");
    for i in 0..5 {
        env.enqueue("t", "acme", &format!("{{\"n\":{i}}}"));
    }
    let mut daemon = Daemon::start(&env);
    wait_until(Duration::from_secs(30), "children posting", || {
        rx.received_on("/slow").len() == 3
    });
    let children: Vec<i32> = env
        .db()
        .prepare("SELECT pid FROM attempts WHERE outcome = 'in_flight'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(children.len(), 3);

    daemon.signal(Signal::SIGTERM);
    let (code, took) = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", daemon.log());
    assert!(
        took < Duration::from_secs(1) + Duration::from_secs(5),
        "exit took {took:?}"
    );
    assert!(daemon.log().contains("stop requested"), "{}", daemon.log());
    for pid in children {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} was killed and reaped"
        );
    }
    // The killed children's leases were settled at once: nothing is leased.
    assert_eq!(env.count_state("leased"), 0);
    assert_eq!(
        env.query_i64("SELECT count(*) FROM attempts WHERE outcome = 'child_died'"),
        3
    );

    rx.set_default("/slow", Reply::Status(200));
    // The endpoint timed out: its breaker is open for its cool-down (1 s).
    run_until(
        &env,
        Duration::from_secs(60),
        "every message delivered",
        || env.count_state("delivered") == 5,
    );
}

#[test]
fn the_daemon_speaks_sd_notify_when_systemd_listens() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("hook", &rx.url("/hook"), &["t"], ""));
    with_schedule(&env, "*/1 * * * * *");
    let socket_path = env.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = env.path().join("daemon.log");
    let mut daemon = env
        .command(&["daemon"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut said = String::new();
    let mut buf = [0u8; 4096];
    let mut read_until = |said: &mut String, want: &str| {
        wait_until(Duration::from_secs(30), want, || {
            if let Ok(n) = socket.recv(&mut buf) {
                said.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            said.contains(want)
        })
    };
    read_until(&mut said, "READY=1");
    read_until(&mut said, "STATUS=run ");
    read_until(&mut said, "WATCHDOG=1");
    kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).unwrap();
    read_until(&mut said, "STOPPING=1");
    assert_eq!(daemon.wait().unwrap().code(), Some(0));
}

#[test]
fn under_journald_log_lines_carry_no_timestamp_of_their_own() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("hook", &rx.url("/hook"), &["t"], ""));
    env.enqueue("t", "acme", "{}");
    let out = env
        .command(&["run"])
        .env("JOURNAL_STREAM", "8:1234")
        .output()
        .unwrap();
    let log = stderr(&out);
    let summary = log
        .lines()
        .find(|l| l.contains("run 1:"))
        .expect("a summary line");
    assert!(summary.starts_with("[INFO "), "{summary}");
    env.enqueue("t", "acme", "{}");
    let out = env.cronpost(&["run"]);
    assert!(
        stderr(&out)
            .lines()
            .any(|l| l.starts_with("[20") && l.contains("run 2:")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_oneshot_run_stops_the_same_way_on_sigterm() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Hang);
    let env = Env::new(
        "max_children = 2\nstop_grace = \"500ms\"\nchild_deadline = \"20s\"\nlease_timeout = \"30s\"",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "mode = \"confirm\"\ntimeout = \"15s\"",
        ),
    );
    env.enqueue("t", "acme", "{}");
    env.enqueue("t", "acme", "{}");
    let mut run = env
        .command(&["run"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "children posting", || {
        rx.received_on("/slow").len() == 2
    });
    let sent = Instant::now();
    kill(Pid::from_raw(run.id() as i32), Signal::SIGTERM).unwrap();
    wait_until(Duration::from_secs(30), "the run exits", || {
        run.try_wait().unwrap().is_some()
    });
    assert!(sent.elapsed() < Duration::from_millis(500) + Duration::from_secs(5));
    assert_eq!(run.wait().unwrap().code(), Some(0));
    assert_eq!(
        env.count_state("leased"),
        0,
        "killed children's leases are settled"
    );
    assert_eq!(env.count_state("delayed"), 2, "and retried later");
}

#[test]
fn sighup_reloads_a_good_config_and_keeps_the_old_one_when_the_new_one_is_bad() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("a", &rx.url("/a"), &["t"], ""));
    with_schedule(&env, "*/1 * * * * *");
    let good = std::fs::read_to_string(&env.config).unwrap();
    let mut daemon = Daemon::start(&env);

    env.write_config(&good.replace("[run]", "[run]\nmax_childs = 1"));
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("config reload failed, keeping the old config");
    assert!(daemon.log().contains("max_childs"));
    assert!(daemon.is_running());
    env.write_config(&good); // for `enqueue`; the daemon has not reloaded it
    env.enqueue("t", "acme", "{}");
    wait_until(Duration::from_secs(30), "the old config delivers", || {
        rx.received_on("/a").len() == 1
    });

    env.write_config(&format!(
        "{good}\n{}",
        endpoint("b", &rx.url("/b"), &["u"], "")
    ));
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for_log("config reloaded");
    env.enqueue("u", "acme", "{}");
    wait_until(
        Duration::from_secs(30),
        "the new endpoint gets messages",
        || rx.received_on("/b").len() == 1,
    );
    assert!(daemon.is_running());
}

#[test]
fn two_concurrent_runs_never_exceed_the_global_child_limit() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Delayed(Duration::from_millis(100), 200));
    let env = Env::new(
        "max_children = 4",
        &endpoint("slow", &rx.url("/slow"), &["t"], "answer_window = \"2s\""),
    );
    let ndjson: String = (0..60)
        .map(|i| format!("{{\"topic\":\"t\",\"account\":\"a{i}\",\"payload\":{{}}}}\n"))
        .collect();
    env.enqueue_ndjson(&ndjson);
    env.run_concurrently_until_delivered(2, 60, Duration::from_secs(120));
    let max = rx.max_concurrency();
    assert!(
        max <= 4,
        "{max} requests at once with max_children = 4 over two runs"
    );
    assert!(max >= 3, "the runs did post concurrently ({max})");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in rx.received_on("/slow") {
        *seen.entry(r.header("webhook-id").to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 60);
    assert!(seen.values().all(|&n| n == 1), "no lease delivered twice");
}

/// Parses Prometheus text: (name with labels) -> value; checks HELP/TYPE.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut values = HashMap::new();
    let mut typed = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "counters end in _total: {line}"
            );
            typed.insert(name.to_string(), kind.to_string());
        } else if line.starts_with("# HELP ") {
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(typed.contains_key(name), "sample before its TYPE: {line}");
            assert!(name.starts_with("cronpost_"));
            values.insert(series.to_string(), value.parse::<f64>().unwrap());
        }
    }
    values
}

#[test]
fn each_run_writes_a_prometheus_text_file_that_agrees_with_stats() {
    let rx = Receiver::start();
    rx.set_default("/b", Reply::Status(404));
    let endpoints =
        endpoint("a", &rx.url("/a"), &["t"], "") + &endpoint("b", &rx.url("/b"), &["t"], "");
    let env = Env::new("", &endpoints);
    env.prepend_config("metrics_file = \"cronpost.prom\"");
    for _ in 0..3 {
        env.enqueue("t", "acme", "{}");
    }
    env.run();

    let path = env.path().join("cronpost.prom");
    let metrics = parse_metrics(&std::fs::read_to_string(&path).unwrap());
    let stats: serde_json::Value = serde_json::from_str(&env.ok(&["stats", "--json"])).unwrap();
    for e in stats["endpoints"].as_array().unwrap() {
        for state in ["ready", "delayed", "leased", "delivered", "dead"] {
            let series = format!(
                "cronpost_deliveries{{endpoint=\"{}\",state=\"{state}\"}}",
                e["endpoint"].as_str().unwrap()
            );
            assert_eq!(metrics[&series], e[state].as_f64().unwrap(), "{series}");
        }
    }
    assert_eq!(
        metrics["cronpost_deliveries{endpoint=\"a\",state=\"delivered\"}"],
        3.0
    );
    assert_eq!(
        metrics["cronpost_deliveries{endpoint=\"b\",state=\"dead\"}"],
        3.0
    );
    assert_eq!(
        metrics["cronpost_last_run_children_forked"],
        stats["last_run"]["forked"].as_f64().unwrap()
    );
    assert_eq!(
        metrics["cronpost_last_run_outcomes{outcome=\"delivered\"}"],
        3.0
    );
    assert_eq!(metrics["cronpost_last_run_outcomes{outcome=\"dead\"}"], 3.0);
    assert_eq!(metrics["cronpost_oldest_ready_age_seconds"], 0.0);
    assert_eq!(metrics["cronpost_runs_total"], 1.0);
    assert!(metrics["cronpost_last_run_duration_seconds"] > 0.0);
    let finished = stats["last_run"]["finished_at_ms"].as_f64().unwrap() / 1000.0;
    assert_eq!(metrics["cronpost_last_run_timestamp_seconds"], finished);

    env.run();
    let metrics = parse_metrics(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(metrics["cronpost_runs_total"], 2.0);
    assert_eq!(
        metrics["cronpost_outcomes_total{outcome=\"delivered\"}"],
        3.0
    );
    let leftovers: Vec<_> = std::fs::read_dir(env.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        })
        .collect();
    assert!(leftovers.is_empty(), "no temporary file left behind");
}

#[test]
fn a_bad_schedule_or_none_is_a_config_error() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("a", &rx.url("/a"), &["t"], ""));
    let out = env.cronpost(&["daemon"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("schedule is required"),
        "{}",
        stderr(&out)
    );
    with_schedule(&env, "every minute");
    for command in ["daemon", "check-config"] {
        let out = env.cronpost(&[command]);
        assert_eq!(out.status.code(), Some(78));
        assert!(
            stderr(&out).contains("line 1: schedule = \"every minute\""),
            "{}",
            stderr(&out)
        );
    }
}
