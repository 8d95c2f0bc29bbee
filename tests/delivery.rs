//! End to end: the real binary, a real SQLite file (and the same tests on a
//! real PostgreSQL), real forked children and a real HTTP receiver on
//! 127.0.0.1.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use cronpost::config::Secret;

on_both_backends!(
    one_message_is_delivered_once_signed_and_byte_identical_with_a_stable_id_across_retries,
    fan_out_reaches_every_subscriber_and_a_failing_one_does_not_hold_back_the_other,
    two_thousand_messages_over_twenty_accounts_arrive_exactly_once_with_eight_children,
    retries_back_off_then_deliver_on_the_third_attempt,
    a_permanent_404_goes_dead_at_once_with_its_status,
    a_closed_port_is_retried_then_dead_after_max_attempts,
    a_child_bounds_its_own_wait_before_its_deadline_and_records_a_retry,
);

const LIMIT: Duration = Duration::from_secs(60);

fn verify(r: &Received) -> bool {
    let secret = Secret::parse(SECRET).unwrap();
    let ts: i64 = r.header("webhook-timestamp").parse().unwrap();
    cronpost::signature::verify(
        &secret,
        r.header("webhook-id"),
        ts,
        &r.body,
        r.header("webhook-signature"),
    )
}

fn one_message_is_delivered_once_signed_and_byte_identical_with_a_stable_id_across_retries(
    backend: Backend,
) {
    let rx = Receiver::start();
    let env = Env::on(
        backend,
        "",
        &endpoint(
            "crm",
            &rx.url("/hook"),
            &["customer.updated"],
            "backoff_base = \"10ms\"\nbackoff_cap = \"20ms\"",
        ),
    );
    rx.queue("/hook", &[Reply::Status(500)]);
    let payload = r#"{"id": 42, "name": "Zoë", "tags": ["a", "b"]}"#;
    env.enqueue("customer.updated", "acme", payload);

    run_until(&env, LIMIT, "delivered", || {
        env.count_state("delivered") == 1
    });

    let got = rx.received_on("/hook");
    assert_eq!(got.len(), 2, "one failed attempt, one delivery");
    for (attempt, r) in got.iter().enumerate() {
        assert_eq!(r.body, payload.as_bytes(), "body byte-identical");
        assert!(verify(r), "signature verifies");
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.header("cronpost-topic"), "customer.updated");
        assert_eq!(r.header("cronpost-account"), "acme");
        assert_eq!(r.header("cronpost-attempt"), (attempt + 1).to_string());
        assert!(r.header("webhook-signature").starts_with("v1,"));
    }
    assert!(got[0].header("webhook-id").starts_with("msg_"));
    assert_eq!(
        got[0].header("webhook-id"),
        got[1].header("webhook-id"),
        "webhook-id stable across a retry"
    );
    let outcomes = env
        .query_rows("SELECT outcome || ':' || http_status FROM attempts ORDER BY id")
        .concat();
    assert_eq!(outcomes, ["retry:500", "delivered:200"]);
}

fn fan_out_reaches_every_subscriber_and_a_failing_one_does_not_hold_back_the_other(
    backend: Backend,
) {
    let rx = Receiver::start();
    let endpoints = endpoint("crm", &rx.url("/crm"), &["invoice.paid"], "")
        + &endpoint(
            "billing",
            &rx.url("/billing"),
            &["invoice.paid"],
            "backoff_base = \"1h\"",
        );
    // Two children: one per delivery, so the retry is not tried in this run.
    let env = Env::on(backend, "max_messages = 2", &endpoints);
    rx.set_default("/billing", Reply::Status(500));
    env.enqueue("invoice.paid", "acme", r#"{"invoice":1}"#);

    env.run();

    assert_eq!(rx.received_on("/crm").len(), 1);
    assert_eq!(rx.received_on("/billing").len(), 1);
    let states = env.query_rows("SELECT endpoint, state, reason FROM deliveries ORDER BY endpoint");
    assert_eq!(
        states,
        [
            ["billing", "delayed", "retry_backoff"],
            ["crm", "delivered", ""]
        ]
    );
}

fn two_thousand_messages_over_twenty_accounts_arrive_exactly_once_with_eight_children(
    backend: Backend,
) {
    let rx = Receiver::start();
    let env = Env::on(
        backend,
        "max_children = 8",
        &endpoint("bulk", &rx.url("/bulk"), &["t"], ""),
    );
    let ndjson: String = (0..2000)
        .map(|i| {
            format!(
                "{{\"topic\":\"t\",\"account\":\"acct{}\",\"payload\":{{\"n\":{i}}}}}\n",
                i % 20
            )
        })
        .collect();
    env.enqueue_ndjson(&ndjson);

    run_until(&env, Duration::from_secs(180), "all delivered", || {
        env.count_state("delivered") == 2000
    });

    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in rx.received_on("/bulk") {
        *seen.entry(r.header("webhook-id").to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2000, "every id arrived");
    assert!(seen.values().all(|&n| n == 1), "none twice");
    // Attempts agree with deliveries: one finished, delivered attempt each.
    assert_eq!(env.query_i64("SELECT count(*) FROM attempts"), 2000);
    assert_eq!(
        env.query_i64(
            "SELECT count(*) FROM attempts WHERE outcome = 'delivered' AND finished_at IS NOT NULL"
        ),
        2000
    );
    assert_eq!(
        env.query_i64("SELECT count(DISTINCT delivery_id) FROM attempts"),
        2000
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM deliveries WHERE attempts != 1"),
        0
    );
    assert_eq!(
        env.query_i64("SELECT sum(forked) - sum(delivered) FROM runs"),
        0,
        "each forked child delivered one message"
    );
}

fn retries_back_off_then_deliver_on_the_third_attempt(backend: Backend) {
    let rx = Receiver::start();
    // One child per run, so a retry that comes due is not tried in the same run.
    let env = Env::on(
        backend,
        "max_messages = 1",
        &endpoint(
            "flaky",
            &rx.url("/flaky"),
            &["t"],
            "backoff_base = \"300ms\"\nbackoff_cap = \"300ms\"",
        ),
    );
    rx.queue("/flaky", &[Reply::Status(500), Reply::Status(500)]);
    env.enqueue("t", "acme", "{}");

    env.run();
    // After the first failure the delivery waits in the delayed queue, its
    // not_before after the failed attempt and within the backoff ceiling.
    let row = env.query_row(
        "SELECT d.state, d.reason, d.not_before - a.finished_at FROM deliveries d JOIN attempts a ON a.delivery_id = d.id",
    );
    assert_eq!(row[..2], ["delayed", "retry_backoff"]);
    let wait: i64 = row[2].parse().unwrap();
    assert!(
        (1..=300).contains(&wait),
        "backoff {wait} ms within (0, 300]"
    );

    run_until(&env, LIMIT, "delivered", || {
        env.count_state("delivered") == 1
    });
    assert_eq!(rx.received_on("/flaky").len(), 3);
    assert_eq!(env.query_i64("SELECT attempts FROM deliveries"), 3);
    assert_eq!(
        env.query_i64(
            "SELECT count(*) FROM attempts WHERE outcome = 'retry' AND http_status = 500"
        ),
        2
    );
}

fn a_permanent_404_goes_dead_at_once_with_its_status(backend: Backend) {
    let rx = Receiver::start();
    let env = Env::on(backend, "", &endpoint("gone", &rx.url("/gone"), &["t"], ""));
    rx.set_default("/gone", Reply::Status(404));
    env.enqueue("t", "acme", "{}");

    env.run();

    assert_eq!(rx.received_on("/gone").len(), 1);
    let row = env.query_row("SELECT state, last_status, last_error FROM deliveries");
    assert_eq!(row[..2], ["dead", "404"]);
    assert!(row[2].contains("404"), "{}", row[2]);
}

fn a_closed_port_is_retried_then_dead_after_max_attempts(backend: Backend) {
    // A port that was just free: connections to it are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::on(
        backend,
        "",
        &endpoint(
            "down",
            &format!("http://127.0.0.1:{port}/x"),
            &["t"],
            "max_attempts = 3\nbackoff_base = \"10ms\"\nbackoff_cap = \"20ms\"\ncooldown_base = \"10ms\"",
        ),
    );
    env.enqueue("t", "acme", "{}");

    run_until(&env, LIMIT, "dead", || env.count_state("dead") == 1);

    assert_eq!(env.query_i64("SELECT attempts FROM deliveries"), 3);
    assert_eq!(
        env.query_i64("SELECT count(*) FROM attempts WHERE outcome = 'retry'"),
        2
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM attempts WHERE outcome = 'dead'"),
        1
    );
    let error = env.query_row("SELECT last_error FROM deliveries").remove(0);
    assert!(
        error.contains("connect") && error.contains("attempt 3 of 3"),
        "{error}"
    );
}

fn a_child_bounds_its_own_wait_before_its_deadline_and_records_a_retry(backend: Backend) {
    let rx = Receiver::start();
    // confirm mode would wait up to 30 s for an answer; the child deadline
    // is 1 s, and the child stops waiting in time to record the outcome.
    let env = Env::on(
        backend,
        "child_deadline = \"1s\"\nlease_timeout = \"7s\"\nmax_messages = 1",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "mode = \"confirm\"\ntimeout = \"30s\"\nbackoff_base = \"10ms\"\nbackoff_cap = \"10ms\"",
        ),
    );
    rx.queue("/slow", &[Reply::Hang]);
    env.enqueue("t", "acme", r#"{"k":1}"#);

    let started = std::time::Instant::now();
    let out = env.cronpost(&["run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        !stderr(&out).contains("passed its deadline"),
        "{}",
        stderr(&out)
    );
    let row = env.query_row(
        "SELECT d.state, a.outcome FROM deliveries d JOIN attempts a ON a.delivery_id = d.id",
    );
    assert_eq!(row, ["delayed", "retry"]);
    run_until(&env, LIMIT, "delivered", || {
        env.count_state("delivered") == 1
    });
    assert_eq!(rx.received_on("/slow").len(), 2);
}

#[test]
fn a_child_killed_past_its_deadline_loses_its_lease_and_a_later_run_delivers() {
    let rx = Receiver::start();
    let env = Env::new(
        "child_deadline = \"6s\"\nlease_timeout = \"15s\"\nmax_messages = 1",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "mode = \"confirm\"\ntimeout = \"30s\"\nbackoff_base = \"10ms\"\nbackoff_cap = \"10ms\"",
        ),
    );
    rx.queue("/slow", &[Reply::Hang]);
    env.enqueue("t", "acme", r#"{"k":1}"#);
    let log = env.path().join("run.log");
    let mut run = env
        .command(&["run"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until(LIMIT, "the child posts", || {
        rx.received_on("/slow").len() == 1
    });
    // An admin's write lock, taken while the child still waits for the
    // answer (until 4.5 s after its fork), keeps it from recording its
    // outcome (busy_timeout 5 s): it is killed at its deadline, holding
    // its lease.
    let (_shell, lock) = env.sqlite3_holding("BEGIN IMMEDIATE; SELECT 'locked';", "locked");
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    // Killed by the parent or by its own alarm, whichever comes first.
    wait_until(LIMIT, "the child is killed", || {
        logged().contains("was killed past its deadline")
    });
    drop(lock);
    assert!(run.wait().unwrap().success(), "{}", logged());
    let (state, outcome): (String, String) = env
        .db()
        .query_row(
            "SELECT d.state, a.outcome FROM deliveries d JOIN attempts a ON a.delivery_id = d.id",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (state.as_str(), outcome.as_str()),
        ("delayed", "child_died"),
        "the lease is given up at once"
    );

    run_until(&env, LIMIT, "delivered", || {
        env.count_state("delivered") == 1
    });
    assert_eq!(rx.received_on("/slow").len(), 2);
    assert_eq!(
        env.query_i64("SELECT count(*) FROM attempts WHERE outcome = 'delivered'"),
        1
    );
    assert_eq!(env.count_state("leased"), 0);
}

#[test]
fn the_receiver_closes_first_so_time_wait_stays_on_its_side() {
    let receiver = Receiver::start();
    let env = Env::new(
        "max_children = 4",
        &endpoint("e", &receiver.url("/e"), &["t"], ""),
    );
    let ndjson: String = (0..40)
        .map(|i| format!("{{\"topic\":\"t\",\"account\":\"a\",\"payload\":{{\"n\":{i}}}}}\n"))
        .collect();
    env.enqueue_ndjson(&ndjson);
    let out = env.cronpost(&["run"]);
    assert!(out.status.success());
    let log = stderr(&out);
    assert!(log.contains("40 delivered"), "{log}");
    assert!(
        log.contains("MiB parent") && log.contains("MiB child"),
        "{log}"
    );
    let port: u16 = receiver
        .url("")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (receiver_side, client_side) = tcp::time_wait(port);
    assert!(receiver_side >= 36, "{receiver_side} / {client_side}");
    assert!(client_side <= 4, "{receiver_side} / {client_side}");
}
