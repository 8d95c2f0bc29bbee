//! The chaos test: thousands of messages across accounts, topics and five
//! endpoints (healthy, flaky, slow, rate-limiting, down for a while), while
//! runs go on and this test SIGKILLs random children, sometimes a parent,
//! and SIGTERMs a daemon. Once the endpoints recover, every delivery must be
//! delivered (or dead with a reason), each seen by its receiver; duplicates
//! only where the attempts table shows a killed child or an expired lease.
//!
//! Bounded for CI (about 30 s of chaos); `CRONPOST_SOAK_SECS=600` soaks longer.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A small deterministic generator, so a failing run can be replayed.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }
}

/// Pids whose parent is `parent`, read from /proc.
#[derive(Default, Debug)]
struct Damage {
    children_killed: u64,
    parents_killed: u64,
    daemons_stopped: u64,
}

#[test]
fn chaos_loses_nothing() {
    let chaos = Duration::from_secs(
        std::env::var("CRONPOST_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let rx = Receiver::start();
    rx.set_default("/flaky", Reply::Flaky(30));
    rx.set_default("/slow", Reply::Delayed(Duration::from_millis(300), 200));
    // A rate limit, learned by the endpoint as it goes (a receiver that
    // refused every n-th request whatever the rate would drive its learned
    // rate down to the floor, and the drain after it would take minutes).
    rx.set_default("/limited", Reply::Limited(40));
    // "down" refuses connections until its receiver starts on this port.
    let down_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let quick = "max_attempts = 1000\nbackoff_base = \"20ms\"\nbackoff_cap = \"300ms\"\ncooldown_base = \"100ms\"\ncooldown_cap = \"500ms\"";
    let endpoints = [
        endpoint(
            "healthy",
            &rx.url("/healthy"),
            &["a.created", "c.deleted"],
            quick,
        ),
        endpoint("flaky", &rx.url("/flaky"), &["a.created"], quick),
        endpoint(
            "slow",
            &rx.url("/slow"),
            &["b.updated"],
            &format!("{quick}\nanswer_window = \"1s\""),
        ),
        endpoint("limited", &rx.url("/limited"), &["b.updated"], quick),
        endpoint(
            "down",
            &format!("http://127.0.0.1:{down_port}/down"),
            &["c.deleted"],
            quick,
        ),
    ]
    .concat();
    let env = Env::new(
        "max_children = 6\nmax_runtime = \"5s\"\nchild_deadline = \"3s\"\nlease_timeout = \"9s\"\nstop_grace = \"500ms\"",
        &format!("[account_budget]\nrate = 200\n\n{endpoints}"),
    );
    // For the daemon; top-level keys go before the first table.
    env.prepend_config("schedule = \"*/1 * * * * *\"");

    let topics = ["a.created", "b.updated", "c.deleted"];
    let messages = 3000;
    let ndjson: String = (0..messages)
        .map(|i| {
            format!(
                "{{\"topic\":\"{}\",\"account\":\"acct{}\",\"payload\":{{\"n\":{i}}},\"priority\":{}}}\n",
                topics[i % 3],
                i % 30,
                i % 3
            )
        })
        .collect();
    env.enqueue_ndjson(&ndjson);

    let mut dice = Dice(0x9E37_79B9_7F4A_7C15);
    let mut damage = Damage::default();
    let mut runs: Vec<Child> = Vec::new();
    let mut daemon: Option<Child> = None;
    let mut down_receiver = None;
    let started = Instant::now();
    while started.elapsed() < chaos {
        runs.retain_mut(|r| r.try_wait().unwrap().is_none());
        while runs.len() < 2 {
            runs.push(env.command(&["run"]).stderr(Stdio::null()).spawn().unwrap());
        }
        if down_receiver.is_none() && started.elapsed() > chaos / 2 {
            down_receiver = Some(Receiver::start_on(down_port));
        }
        let parents: Vec<u32> = runs
            .iter()
            .map(|r| r.id())
            .chain(daemon.as_ref().map(|d| d.id()))
            .collect();
        for parent in &parents {
            for child in children_of(*parent) {
                if dice.roll(4) == 0 && kill(Pid::from_raw(child), Signal::SIGKILL).is_ok() {
                    damage.children_killed += 1;
                }
            }
        }
        match dice.roll(20) {
            0 => {
                let victim = &runs[dice.roll(runs.len() as u64) as usize];
                if kill(Pid::from_raw(victim.id() as i32), Signal::SIGKILL).is_ok() {
                    damage.parents_killed += 1;
                }
            }
            1 if daemon.is_none() => {
                daemon = Some(
                    env.command(&["daemon"])
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap(),
                );
            }
            2 => {
                if let Some(mut d) = daemon.take() {
                    kill(Pid::from_raw(d.id() as i32), Signal::SIGTERM).unwrap();
                    assert_eq!(
                        d.wait().unwrap().code(),
                        Some(0),
                        "the daemon stops cleanly"
                    );
                    damage.daemons_stopped += 1;
                }
            }
            _ => {}
        }
        // Chaos pacing, not synchronisation: the assertions come after.
        std::thread::sleep(Duration::from_millis(50));
    }
    for mut run in runs {
        let _ = run.wait();
    }
    if let Some(mut d) = daemon.take() {
        kill(Pid::from_raw(d.id() as i32), Signal::SIGTERM).unwrap();
        let _ = d.wait();
    }
    let _down = down_receiver.unwrap_or_else(|| Receiver::start_on(down_port));

    // The endpoints recover; runs go on until nothing waits.
    rx.set_default("/flaky", Reply::Status(200));
    rx.set_default("/limited", Reply::Status(200));
    let left = || {
        env.query_i64(
            "SELECT count(*) FROM deliveries WHERE state IN ('ready', 'delayed', 'leased')",
        )
    };
    run_until(
        &env,
        Duration::from_secs(240),
        "every delivery settled",
        || left() == 0,
    );

    // Every delivery delivered, or dead with its reason.
    let deliveries = env.query_i64("SELECT count(*) FROM deliveries");
    assert_eq!(
        deliveries,
        messages as i64 * 2,
        "fan-out: two subscribers per topic"
    );
    assert_eq!(
        env.query_i64(
            "SELECT count(*) FROM deliveries WHERE state = 'dead' AND last_error IS NULL"
        ),
        0
    );
    let dead = env.count_state("dead");

    // Each delivered delivery was seen by its receiver, answered 2xx.
    let db = env.db();
    let mut delivered: Vec<(i64, String, String)> = db
        .prepare(
            "SELECT d.id, m.uid, d.endpoint FROM deliveries d JOIN messages m ON m.id = d.message_id
             WHERE d.state = 'delivered'",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    delivered.sort();
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let received: Vec<Received> = rx.received().into_iter().chain(_down.received()).collect();
    for r in &received {
        if r.status.is_some_and(|s| (200..300).contains(&s)) {
            let endpoint = r.path.trim_start_matches('/').to_string();
            *seen
                .entry((r.header("webhook-id").to_string(), endpoint))
                .or_default() += 1;
        }
    }
    let lost: Vec<_> = delivered
        .iter()
        .filter(|(_, uid, ep)| !seen.contains_key(&(uid.clone(), ep.clone())))
        .collect();
    assert!(
        lost.is_empty(),
        "{} delivered but never received: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );

    // Duplicates only where a child died or a lease ran out.
    let explained: HashSet<(String, String)> = db
        .prepare(
            "SELECT DISTINCT m.uid, d.endpoint FROM attempts a
             JOIN deliveries d ON d.id = a.delivery_id JOIN messages m ON m.id = d.message_id
             WHERE a.outcome IN ('child_died', 'lease_expired', 'lease_lost')",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let duplicates: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.clone())
        .collect();
    let unexplained: Vec<_> = duplicates
        .iter()
        .filter(|k| !explained.contains(*k))
        .collect();
    assert!(
        unexplained.is_empty(),
        "duplicates with no killed child or expired lease: {unexplained:?}"
    );

    assert_eq!(env.count_state("leased"), 0, "nothing stuck leased");
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let attempts_died = env.query_i64(
        "SELECT count(*) FROM attempts WHERE outcome IN ('child_died', 'lease_expired')",
    );
    println!(
        "chaos {:?}: {messages} messages, {deliveries} deliveries; killed {} children and {} parents, stopped {} daemons; \
         {attempts_died} attempts died or expired; {} delivered, {dead} dead, {} duplicates (all explained), {} lost",
        chaos,
        damage.children_killed,
        damage.parents_killed,
        damage.daemons_stopped,
        delivered.len(),
        duplicates.len(),
        lost.len()
    );
    assert!(
        damage.children_killed > 0,
        "the chaos did damage: {damage:?}"
    );
}
