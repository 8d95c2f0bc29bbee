//! PostgreSQL as the queue: the real binary on a real server this test
//! binary starts (tests/common/postgres.rs), children connecting directly
//! and through PgBouncer in transaction pooling, and two dispatcher "hosts"
//! (two processes with their own configs and slot directories) draining one
//! queue: every message once, nothing lost when one host is SIGKILLed, and
//! account budgets and in-flight caps held across both.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Enqueues `count` messages of topic `t`, account `account` (or one per
/// message when None), in one NDJSON batch.
fn enqueue(env: &Env, count: usize, account: Option<&str>) {
    let lines: String = (0..count)
        .map(|i| {
            let account = account.map_or(format!("a{}", i % 50), str::to_string);
            format!("{{\"topic\":\"t\",\"account\":\"{account}\",\"payload\":{{\"n\":{i}}}}}\n")
        })
        .collect();
    env.enqueue_ndjson(&lines);
}

/// `cronpost run` of the host whose config is `config`.
fn start_run(env: &Env, config: &Path) -> Child {
    env.command(&["run"])
        .env("CRONPOST_CONFIG", config)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

/// Runs both hosts, each again and again, until `done` holds.
fn run_hosts_until(
    env: &Env,
    hosts: &[&Path],
    limit: Duration,
    what: &str,
    done: impl Fn() -> bool,
) {
    let deadline = Instant::now() + limit;
    let mut running: Vec<Option<Child>> = hosts.iter().map(|_| None).collect();
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        for (slot, config) in running.iter_mut().zip(hosts) {
            let finished = match slot {
                None => true,
                Some(child) => match child.try_wait().unwrap() {
                    Some(status) => {
                        assert!(status.success(), "a run failed: {status}");
                        true
                    }
                    None => false,
                },
            };
            if finished {
                *slot = Some(start_run(env, config));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for mut child in running.into_iter().flatten() {
        assert!(child.wait().unwrap().success());
    }
}

/// How often each webhook-id arrived.
fn arrivals(rx: &Receiver) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in rx.received() {
        *seen.entry(r.header("webhook-id").to_string()).or_default() += 1;
    }
    seen
}

#[test]
fn enqueue_run_and_admin_commands_work_on_postgres_directly_and_through_pgbouncer() {
    let latest = cronpost::store::PostgresStore::latest_schema_version();
    for through_bouncer in [false, true] {
        let rx = Receiver::start();
        let env = Env::on_postgres(
            "max_children = 4",
            &endpoint("hook", &rx.url("/hook"), &["t"], "max_attempts = 1"),
            through_bouncer,
        );
        env.enqueue("t", "acme", r#"{"hello":"world"}"#);
        enqueue(&env, 40, None);
        rx.set_default("/hook", Reply::Status(200));
        env.run();
        wait_until(Duration::from_secs(10), "41 requests", || {
            rx.received().len() >= 41
        });
        assert_eq!(env.count_state("delivered"), 41);
        let first = rx
            .received()
            .into_iter()
            .find(|r| r.body == br#"{"hello":"world"}"#)
            .expect("the first message arrived as written");
        assert!(first.header("webhook-signature").starts_with("v1,"));

        let stats: serde_json::Value = serde_json::from_str(&env.ok(&["stats", "--json"])).unwrap();
        assert_eq!(stats["endpoints"][0]["delivered"], 41, "{stats}");
        let listed = env.ok(&["list", "--state", "delivered", "--limit", "5"]);
        assert_eq!(
            listed.lines().filter(|l| l.contains("delivered")).count(),
            5,
            "{listed}"
        );
        assert!(env.ok(&["show", "1"]).contains("hook"));
        assert!(
            env.ok(&["check-config"])
                .contains(&format!("PostgreSQL, schema version {latest} of {latest}"))
        );
        assert!(
            env.ok(&["migrate"])
                .contains(&format!("schema version {latest}"))
        );

        // A dead letter, requeued and delivered.
        rx.queue("/hook", &[Reply::Status(500)]);
        env.enqueue("t", "acme", "{}");
        env.run();
        assert_eq!(env.count_state("dead"), 1);
        assert!(env.ok(&["requeue", "--endpoint", "hook"]).contains('1'));
        env.run();
        assert_eq!(env.count_state("delivered"), 42);
        assert!(
            env.ok(&["purge", "--older-than", "0s"])
                .contains("purged 42")
        );

        // A backup is pg_dump's job: said, with the usage exit code.
        let out = env.cronpost(&["backup", env.path().join("b.db").to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
        assert!(stderr(&out).contains("pg_dump"), "{}", stderr(&out));
    }
}

#[test]
fn a_server_that_is_not_there_is_one_clear_error() {
    let env = Env::new("", &endpoint("hook", "http://127.0.0.1:9/x", &["t"], ""));
    let text = std::fs::read_to_string(&env.config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://postgres@{}:5999/nothing",
        dir.path().to_str().unwrap().replace('/', "%2F")
    );
    env.write_config(&text.replacen("database = \"q.db\"", &format!("database = \"{url}\""), 1));
    let out = env.cronpost(&["enqueue", "--topic", "t", "--account", "a", "--data", "{}"]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("database postgres://"),
        "{}",
        stderr(&out)
    );

    env.write_config(&text.replacen("database = \"q.db\"", "database = \"postgres://x:y:z\"", 1));
    let out = env.cronpost(&["check-config"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("database"), "{}", stderr(&out));
}

#[test]
fn two_hosts_drain_ten_thousand_messages_each_delivered_once() {
    let rx = Receiver::start();
    let env = Env::on_postgres(
        "max_children = 4\nmax_messages = 100000",
        &endpoint("hook", &rx.url("/hook"), &["t"], ""),
        true,
    );
    let other = env.other_host("b");
    enqueue(&env, 10_000, None);
    run_hosts_until(
        &env,
        &[&env.config, &other],
        Duration::from_secs(600),
        "10,000 delivered",
        || env.count_state("delivered") == 10_000,
    );
    let seen = arrivals(&rx);
    assert_eq!(seen.len(), 10_000);
    assert!(seen.values().all(|&n| n == 1), "a message arrived twice");
    // Both hosts dispatched, and say so.
    let hosts = env.query_rows("SELECT DISTINCT host FROM runs ORDER BY host");
    assert_eq!(hosts, [["a"], ["b"]]);
    assert!(
        env.ok(&["stats"]).contains("(host "),
        "stats names the last run's host"
    );
}

#[test]
fn a_host_killed_mid_run_loses_nothing() {
    let rx = Receiver::start();
    rx.set_default("/hook", Reply::Delayed(Duration::from_millis(50), 200));
    let env = Env::on_postgres(
        "max_children = 4\nmax_messages = 100000\nlease_timeout = \"10s\"\nchild_deadline = \"5s\"",
        &endpoint("hook", &rx.url("/hook"), &["t"], "answer_window = \"1s\""),
        true,
    );
    env.prepend_config("busy_timeout = \"2s\"");
    let other = env.other_host("b");
    enqueue(&env, 2_000, None);
    // The doomed host in a process group of its own: one kill takes its
    // parent, keeper and children at once.
    let mut doomed = {
        use std::os::unix::process::CommandExt;
        env.command(&["run"])
            .env("RUST_LOG", "warn")
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut survivor = start_run(&env, &other);
    wait_until(Duration::from_secs(120), "some delivered", || {
        env.count_state("delivered") >= 300
    });
    // The host dies: its parent, its children, its keeper.
    kill(Pid::from_raw(-(doomed.id() as i32)), Signal::SIGKILL).unwrap();
    doomed.wait().unwrap();
    assert!(survivor.wait().unwrap().success());
    run_hosts_until(
        &env,
        &[&other],
        Duration::from_secs(300),
        "2,000 delivered",
        || env.count_state("delivered") == 2_000,
    );
    let seen = arrivals(&rx);
    assert_eq!(seen.len(), 2_000, "every message arrived");
    // A message arrived twice only if the killed host held its lease: the
    // attempt it left open expired and another host delivered it again.
    for (uid, _) in seen.iter().filter(|(_, n)| **n > 1) {
        assert_eq!(
            env.query_i64(&format!(
                "SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                 JOIN messages m ON m.id = d.message_id
                 WHERE m.uid = '{uid}' AND a.outcome = 'lease_expired' AND a.lease_owner LIKE 'a.%'"
            )),
            1,
            "{uid} arrived twice without a lease of the killed host expiring"
        );
    }
    // The expired leases are all the killed host's, at most one per child.
    let expired = env.query_i64("SELECT count(*) FROM attempts WHERE outcome = 'lease_expired'");
    let of_a = env.query_i64(
        "SELECT count(*) FROM attempts WHERE outcome = 'lease_expired' AND lease_owner LIKE 'a.%'",
    );
    assert_eq!(expired, of_a, "only the killed host's leases expired");
    assert!(
        expired <= 4,
        "{expired} leases expired: more than its 4 children held"
    );
    assert!(
        env.query_i64("SELECT count(*) FROM runs WHERE host = 'b'") >= 1,
        "the survivor recorded its runs as host b"
    );
}

#[test]
fn an_account_budget_holds_across_two_hosts() {
    let rx = Receiver::start();
    let env = Env::on_postgres(
        "max_children = 4\nmax_messages = 100000",
        &format!(
            "[account_budget.overrides]\nnoisy = {{ rate = 50 }}\n\n{}",
            endpoint("hook", &rx.url("/hook"), &["t"], "")
        ),
        true,
    );
    let other = env.other_host("b");
    enqueue(&env, 400, Some("noisy"));
    run_hosts_until(
        &env,
        &[&env.config, &other],
        Duration::from_secs(120),
        "400 delivered",
        || env.count_state("delivered") == 400,
    );
    assert_eq!(rx.received().len(), 400, "each delivered once");
    // The budget is charged when a child leases: by the lease times (one
    // clock, the database rows'), from the first, at most the burst (one
    // second's worth by default) plus the rate since.
    let leased: Vec<i64> = env
        .query_rows("SELECT started_at FROM attempts ORDER BY started_at")
        .iter()
        .map(|r| r[0].parse().unwrap())
        .collect();
    assert_eq!(leased.len(), 400);
    for (k, at) in leased.iter().enumerate() {
        let allowed = 50.0 + 50.0 * (at - leased[0]) as f64 / 1000.0 + 1.0;
        assert!(
            (k + 1) as f64 <= allowed,
            "{} leased within {} ms of the first",
            k + 1,
            at - leased[0]
        );
    }
    let span = Duration::from_millis((leased[399] - leased[0]) as u64);
    assert!(
        span >= Duration::from_secs_f64(350.0 / 50.0 * 0.95),
        "400 at 50/s took {span:?}"
    );
}

#[test]
fn max_in_flight_holds_across_two_hosts() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Delayed(Duration::from_millis(200), 200));
    let env = Env::on_postgres(
        "max_children = 4",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "max_in_flight = 3\nanswer_window = \"2s\"",
        ),
        true,
    );
    let other = env.other_host("b");
    enqueue(&env, 40, None);
    run_hosts_until(
        &env,
        &[&env.config, &other],
        Duration::from_secs(120),
        "40 delivered",
        || env.count_state("delivered") == 40,
    );
    assert_eq!(rx.received_on("/slow").len(), 40, "each delivered once");
    let max = rx.max_concurrency();
    assert!(max <= 3, "the receiver saw {max} requests at once");
    assert!(max >= 2, "hosts did post concurrently ({max})");
}

#[test]
fn the_readme_queries_answer_on_postgres_through_psql() {
    let rx = Receiver::start();
    let env = Env::on_postgres("", &endpoint("hook", &rx.url("/hook"), &["t"], ""), false);
    enqueue(&env, 5, None);
    env.run();
    let pg = env.pg.as_ref().unwrap();
    let queries = readme_queries();
    assert!(queries.len() >= 8);
    for query in queries {
        let out = postgres::cluster()
            .psql(&pg.name)
            .args(["-c", &query])
            .output()
            .unwrap();
        assert!(out.status.success(), "{query}: {}", stderr(&out));
    }
    assert_eq!(
        pg.sql("SELECT deliveries FROM queue_depth WHERE state = 'delivered'"),
        "5"
    );
}

#[test]
fn the_daemon_hears_new_messages_through_listen_notify_far_from_its_schedule() {
    let rx = Receiver::start();
    let env = Env::on_postgres("", &endpoint("e", &rx.url("/e"), &["t"], ""), true);
    env.prepend_config("schedule = \"0 0 0 1 1 *\"");
    let log = env.path().join("daemon.log");
    let mut daemon = env
        .command(&["daemon"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "the daemon is up", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("daemon started")
    });
    let pg = env.pg.as_ref().unwrap();
    for i in 1..=6 {
        let sent = Instant::now();
        if i <= 3 {
            env.enqueue("t", "cli", &format!("{{\"i\":{i}}}"));
        } else {
            pg.sql("INSERT INTO messages (topic, account, payload) VALUES ('t', 'sql', '{}')");
        }
        wait_until(Duration::from_secs(30), "delivered", || {
            rx.received().len() >= i
        });
        let took = rx.received()[i - 1].at.saturating_duration_since(sent);
        assert!(took < Duration::from_secs(10), "message {i} took {took:?}");
    }
    kill(Pid::from_raw(daemon.id() as i32), Signal::SIGTERM).unwrap();
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn a_lock_held_longer_than_busy_timeout_fails_the_write_clearly_and_writes_nothing() {
    use std::io::{BufRead, Write};
    let rx = Receiver::start();
    let env = Env::on_postgres("", &endpoint("hook", &rx.url("/hook"), &["t"], ""), true);
    env.prepend_config("busy_timeout = \"1s\"");
    env.enqueue("t", "acme", "{}");
    // An admin's transaction holding the messages table, as psql would.
    let pg = env.pg.as_ref().unwrap();
    let mut shell = postgres::cluster()
        .psql(&pg.name)
        .args(["-A", "-t"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = shell.stdin.take().unwrap();
    writeln!(
        stdin,
        "BEGIN; LOCK TABLE messages IN EXCLUSIVE MODE; SELECT 'locked';"
    )
    .unwrap();
    stdin.flush().unwrap();
    let mut out = std::io::BufReader::new(shell.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("locked") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "psql ended");
    }

    let started = Instant::now();
    let out = env.cronpost(&[
        "enqueue",
        "--topic",
        "t",
        "--account",
        "acme",
        "--data",
        "{}",
    ]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("lock timeout"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(20));
    drop(stdin);
    shell.wait().unwrap();
    assert_eq!(
        env.query_i64("SELECT count(*) FROM messages"),
        1,
        "nothing written"
    );
    env.enqueue("t", "acme", "{}");
    assert_eq!(env.query_i64("SELECT count(*) FROM messages"), 2);
}

#[test]
fn bad_multi_host_settings_are_config_errors_naming_the_key() {
    let env = Env::new("", &endpoint("hook", "http://127.0.0.1:9/x", &["t"], ""));
    let good = std::fs::read_to_string(&env.config).unwrap();
    let pg = "database = \"postgres://postgres@localhost/q\"";
    for (text, expected) in [
        (
            good.replacen("database = \"q.db\"", "database = \"postgres://x:y:z\"", 1),
            "database",
        ),
        (
            good.replacen(
                "database = \"q.db\"",
                "database = \"q.db\"\nlisten_database = \"postgres://h/q\"",
                1,
            ),
            "listen_database is for a PostgreSQL database",
        ),
        (
            good.replacen(
                "database = \"q.db\"",
                &format!("{pg}\nlisten_database = \"q.db\""),
                1,
            ),
            "listen_database must be a postgres://",
        ),
        (
            good.replacen(
                "database = \"q.db\"",
                "database = \"q.db\"\nhost_name = \"web 1\"",
                1,
            ),
            "host_name = \"web 1\" must be",
        ),
        (
            good.replacen(
                "database = \"q.db\"",
                "database = \"q.db\"\nslots_dir = \"\"",
                1,
            ),
            "slots_dir must not be empty",
        ),
    ] {
        env.write_config(&text);
        let out = env.cronpost(&["check-config"]);
        assert_eq!(out.status.code(), Some(78), "{expected}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{expected}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn a_database_migrated_by_a_newer_build_is_refused() {
    let env = Env::on_postgres(
        "",
        &endpoint("hook", "http://127.0.0.1:9/x", &["t"], ""),
        false,
    );
    env.ok(&["migrate"]);
    let pg = env.pg.as_ref().unwrap();
    pg.sql(
        "INSERT INTO cronpost_schema (version, file, applied_at) VALUES (99, '0099_future.sql', 0)",
    );
    let out = env.cronpost(&["stats"]);
    assert_eq!(out.status.code(), Some(70), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "schema version 99, newer than this build's {}",
            cronpost::store::PostgresStore::latest_schema_version()
        )),
        "{}",
        stderr(&out)
    );
}
