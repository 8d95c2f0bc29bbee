//! New work leaves at once, not at the next tick: the daemon (with a
//! schedule that never comes) and the lingering oneshot wake on a message
//! from `cronpost enqueue` and from plain SQL, at the due time of a retry,
//! and a message of a higher priority overtakes a backlog. Deadlines are
//! generous for a loaded machine: the figures are in bench/ (BENCHMARKS.md).

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Far below any schedule: "at midnight on January 1st".
const NEVER: &str = "0 0 0 1 1 *";
const LIMIT: Duration = Duration::from_secs(30);

struct Running(Child);

impl Running {
    fn stop(mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM).unwrap();
        let status = self.0.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon(env: &Env) -> Running {
    env.prepend_config(&format!("schedule = \"{NEVER}\""));
    let log = env.path().join("daemon.log");
    let child = env
        .command(&["daemon"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until(LIMIT, "the daemon is up", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("daemon started")
    });
    Running(child)
}

/// How long after `since` the `n`-th request reached `path`.
fn arrived_after(rx: &Receiver, path: &str, n: usize, since: Instant) -> Duration {
    wait_until(LIMIT, &format!("{n} requests on {path}"), || {
        rx.received_on(path).len() >= n
    });
    rx.received_on(path)[n - 1]
        .at
        .saturating_duration_since(since)
}

#[test]
fn the_daemon_wakes_on_enqueue_and_on_plain_sql_far_from_its_schedule() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    let daemon = daemon(&env);
    for i in 1..=3 {
        let sent = Instant::now();
        env.enqueue("t", "cli", &format!("{{\"i\":{i}}}"));
        let took = arrived_after(&rx, "/e", i, sent);
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    for i in 4..=6 {
        let sent = Instant::now();
        rusqlite::Connection::open(&env.db)
            .unwrap()
            .execute(
                "INSERT INTO messages (topic, account, payload) VALUES ('t', 'sql', '{}')",
                [],
            )
            .unwrap();
        let took = arrived_after(&rx, "/e", i, sent);
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    assert!(daemon.stop().success());
}

#[test]
fn the_daemon_wakes_when_a_retry_comes_due() {
    let rx = Receiver::start();
    rx.queue("/e", &[Reply::Status(500)]);
    let env = Env::new(
        "",
        &endpoint(
            "e",
            &rx.url("/e"),
            &["t"],
            "backoff_base = \"1s\"\nbackoff_cap = \"1s\"",
        ),
    );
    let daemon = daemon(&env);
    let sent = Instant::now();
    env.enqueue("t", "a", "{}");
    arrived_after(&rx, "/e", 1, sent);
    // The retry is due within a second; no schedule time comes.
    let took = arrived_after(&rx, "/e", 2, sent);
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(rx.received_on("/e")[1].status, Some(200));
    wait_until(LIMIT, "recorded", || env.count_state("delivered") == 1);
    assert!(daemon.stop().success());
}

#[test]
fn a_lingering_run_delivers_what_comes_while_it_runs_and_ends_at_max_runtime() {
    let rx = Receiver::start();
    let env = Env::new(
        "max_runtime = \"4s\"",
        &endpoint("e", &rx.url("/e"), &["t"], ""),
    );
    env.ok(&["migrate"]);
    let started = Instant::now();
    let mut run = env
        .command(&["run", "--linger"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Enqueued after the run started and found nothing.
    wait_until(LIMIT, "the run started", || {
        env.query_i64("SELECT count(*) FROM runs") == 1
    });
    for i in 1..=3 {
        let sent = Instant::now();
        env.enqueue("t", "a", "{}");
        let took = arrived_after(&rx, "/e", i, sent);
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    wait_until(LIMIT, "the run ends at max_runtime", || {
        run.try_wait().unwrap().is_some()
    });
    assert!(run.wait().unwrap().success());
    assert!(started.elapsed() >= Duration::from_secs(4));
    let (routed, delivered): (i64, i64) = env
        .db()
        .query_row("SELECT routed, delivered FROM runs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((routed, delivered), (3, 3), "one run did it all");
}

#[test]
fn a_message_of_higher_priority_overtakes_a_backlog_that_is_draining() {
    let rx = Receiver::start();
    rx.set_default("/e", Reply::Delayed(Duration::from_millis(20), 200));
    let env = Env::new(
        "max_children = 2",
        &endpoint("e", &rx.url("/e"), &["t"], "answer_window = \"1s\""),
    );
    let backlog: String = (0..2_000)
        .map(|i| format!("{{\"topic\":\"t\",\"account\":\"bulk\",\"payload\":{{\"n\":{i}}}}}\n"))
        .collect();
    env.enqueue_ndjson(&backlog);
    let run = Running(env.command(&["run"]).stderr(Stdio::null()).spawn().unwrap());
    wait_until(LIMIT, "the drain is under way", || {
        rx.received_on("/e").len() >= 50
    });
    let before = rx.received_on("/e").len();
    env.ok(&[
        "enqueue",
        "--topic",
        "t",
        "--account",
        "urgent",
        "--priority",
        "1000",
        "--data",
        "{}",
    ]);
    wait_until(LIMIT, "the urgent message arrives", || {
        rx.received_on("/e")
            .iter()
            .any(|r| r.header("cronpost-account") == "urgent")
    });
    let position = rx
        .received_on("/e")
        .iter()
        .position(|r| r.header("cronpost-account") == "urgent")
        .unwrap();
    assert!(
        position < before + 20,
        "arrived as number {position}, {before} had arrived when it was enqueued"
    );
    assert!(
        rx.received_on("/e").len() < 1_500,
        "it did not wait for the backlog"
    );
    drop(run);
}

#[test]
fn new_work_gets_a_child_while_a_slow_one_is_still_in_flight() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Hang);
    let endpoints = endpoint(
        "slow",
        &rx.url("/slow"),
        &["slow"],
        "mode = \"confirm\"\ntimeout = \"60s\"",
    ) + &endpoint("fast", &rx.url("/fast"), &["fast"], "");
    let env = Env::new(
        "max_children = 2\nchild_deadline = \"90s\"\nlease_timeout = \"100s\"",
        &endpoints,
    );
    env.enqueue("slow", "a", "{}");
    let run = Running(env.command(&["run"]).stderr(Stdio::null()).spawn().unwrap());
    // The run counted one delivery and forked for it: it knows of no more.
    wait_until(LIMIT, "the slow delivery is in flight", || {
        rx.received_on("/slow").len() == 1
    });
    env.enqueue("fast", "b", "{}");
    // Within LIMIT, far below the slow child's 60 s: the keeper woke the
    // parent, which did not wait for its child to end.
    wait_until(LIMIT, "the new message arrives", || {
        rx.received_on("/fast").len() == 1
    });
    assert_eq!(env.count_state("leased"), 1, "the slow child is in flight");
    drop(run);
}
