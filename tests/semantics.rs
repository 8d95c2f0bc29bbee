//! Delivery semantics end to end, with the real binary, real children and a
//! real receiver on 127.0.0.1: expiry (a message's time to live, a topic's
//! max_age) and ordering keys; on SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use common::*;

on_both_backends!(
    a_message_held_past_its_time_to_live_is_never_posted_and_shows_as_expired,
    a_keys_messages_arrive_in_order_through_retries,
    a_keys_messages_arrive_in_order_through_a_saturated_endpoint,
    a_dead_letter_blocks_its_key_where_on_dead_is_block_until_requeued,
    a_thousand_messages_over_fifty_keys_arrive_in_order_per_key_with_eight_children,
);

/// The `n` and `k` of a received payload `{"k": .., "n": ..}`.
fn key_and_number(r: &Received) -> (String, i64) {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    (
        v["k"].as_str().unwrap().to_string(),
        v["n"].as_i64().unwrap(),
    )
}

/// For each key, its requests in arrival order: a message is never posted
/// before the one published before it was answered 2xx.
fn assert_in_order_per_key(received: &[Received], keys: usize, per_key: i64) {
    let mut next: std::collections::HashMap<String, i64> = Default::default();
    for r in received {
        let (k, n) = key_and_number(r);
        let expected = next.entry(k.clone()).or_insert(0);
        assert_eq!(
            n, *expected,
            "key {k}: message {n} posted while {expected} was not delivered"
        );
        if r.status.is_some_and(|s| (200..300).contains(&s)) {
            *expected += 1;
        }
    }
    assert_eq!(next.len(), keys);
    assert!(next.values().all(|&n| n == per_key), "{next:?}");
}

fn a_message_held_past_its_time_to_live_is_never_posted_and_shows_as_expired(backend: Backend) {
    let rx = Receiver::start();
    // The first request opens the endpoint's breaker for ten minutes.
    rx.queue("/sat", &[Reply::RetryAfter(429, "600")]);
    let endpoints = endpoint("sat", &rx.url("/sat"), &["t", "d"], "");
    let env = Env::on(
        backend,
        "",
        &format!("[topics.d]\nmax_age = \"1s\"\ndiscard_expired = true\n\n{endpoints}"),
    );
    env.prepend_config("metrics_file = \"metrics.prom\"\n");
    env.enqueue("t", "a", "{\"first\":true}");
    env.run();
    assert_eq!(rx.received_on("/sat").len(), 1);

    env.ok(&[
        "enqueue",
        "--topic",
        "t",
        "--account",
        "a",
        "--ttl",
        "1s",
        "--data",
        "{\"n\":1}",
    ]);
    env.enqueue_ndjson("{\"topic\":\"d\",\"account\":\"a\",\"payload\":{\"n\":2}}\n");
    env.run();
    assert_eq!(
        env.query_i64("SELECT count(*) FROM deliveries WHERE reason = 'endpoint_saturated'"),
        3,
        "all held by the breaker"
    );
    run_until(&env, Duration::from_secs(20), "both expired", || {
        // One dead, the discarded one gone: they expire a moment apart.
        env.query_i64("SELECT count(*) FROM deliveries WHERE state = 'dead' AND reason = 'expired'")
            == 1
            && env.query_i64("SELECT count(*) FROM deliveries") == 2
    });
    assert_eq!(rx.received_on("/sat").len(), 1, "never posted");
    // The topic that discards: its delivery is gone, counted.
    let runs =
        env.query_rows("SELECT coalesce(sum(expired), 0), coalesce(sum(discarded), 0) FROM runs");
    assert_eq!(runs, [["1", "1"]]);
    let metrics = std::fs::read_to_string(env.dir.path().join("metrics.prom")).unwrap();
    assert!(
        metrics.contains("cronpost_outcomes_total{outcome=\"expired\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cronpost_outcomes_total{outcome=\"discarded\"} 1"),
        "{metrics}"
    );
    let id = env.query_i64("SELECT message_id FROM deliveries WHERE reason = 'expired'");
    let shown = env.ok(&["show", &id.to_string()]);
    assert!(shown.contains(", expires "), "{shown}");
    assert!(shown.contains("dead [expired]"), "{shown}");
    let dead: serde_json::Value =
        serde_json::from_str(&env.ok(&["list", "--reason", "expired", "--json"])).unwrap();
    assert_eq!(dead.as_array().unwrap().len(), 1);
}

fn a_keys_messages_arrive_in_order_through_retries(backend: Backend) {
    let rx = Receiver::start();
    rx.queue("/e", &[Reply::Status(500), Reply::Status(500)]);
    let env = Env::on(
        backend,
        "max_children = 4",
        &endpoint(
            "e",
            &rx.url("/e"),
            &["t"],
            "backoff_base = \"10ms\"\nbackoff_cap = \"10ms\"",
        ),
    );
    let lines: String = (0..3)
        .map(|n| format!("{{\"topic\":\"t\",\"account\":\"a\",\"ordering_key\":\"c42\",\"payload\":{{\"k\":\"c42\",\"n\":{n}}}}}\n"))
        .collect();
    env.enqueue_ndjson(&lines);
    run_until(&env, Duration::from_secs(30), "all three delivered", || {
        env.count_state("delivered") == 3
    });
    let got: Vec<i64> = rx
        .received_on("/e")
        .iter()
        .map(|r| key_and_number(r).1)
        .collect();
    assert_eq!(
        got,
        [0, 0, 0, 1, 2],
        "the first twice refused, then each in order"
    );
    assert_in_order_per_key(&rx.received_on("/e"), 1, 3);
    let shown = env.ok(&["show", "1"]);
    assert!(shown.contains("ordering key \"c42\""), "{shown}");
}

fn a_keys_messages_arrive_in_order_through_a_saturated_endpoint(backend: Backend) {
    let rx = Receiver::start();
    // The first request opens the breaker for a second: every delivery in
    // progress is held back, the keys' later ones keep waiting.
    rx.queue("/e", &[Reply::RetryAfter(429, "1")]);
    let env = Env::on(
        backend,
        "max_children = 4",
        &endpoint(
            "e",
            &rx.url("/e"),
            &["t"],
            "backoff_base = \"10ms\"\nbackoff_cap = \"10ms\"",
        ),
    );
    let lines: String = (0..10)
        .map(|i| {
            let (k, n) = (["c", "d"][i % 2], i / 2);
            format!("{{\"topic\":\"t\",\"account\":\"a\",\"ordering_key\":\"{k}\",\"payload\":{{\"k\":\"{k}\",\"n\":{n}}}}}\n")
        })
        .collect();
    env.enqueue_ndjson(&lines);
    run_until(&env, Duration::from_secs(30), "all ten delivered", || {
        env.count_state("delivered") == 10
    });
    let received = rx.received_on("/e");
    assert_eq!(received[0].status, Some(429));
    assert_in_order_per_key(&received, 2, 5);
}

fn a_dead_letter_blocks_its_key_where_on_dead_is_block_until_requeued(backend: Backend) {
    let rx = Receiver::start();
    rx.queue("/e", &[Reply::Status(422)]);
    let env = Env::on(
        backend,
        "",
        &endpoint("e", &rx.url("/e"), &["t"], "on_dead = \"block\""),
    );
    let lines: String = (0..3)
        .map(|n| format!("{{\"topic\":\"t\",\"account\":\"a\",\"ordering_key\":\"o7\",\"payload\":{{\"k\":\"o7\",\"n\":{n}}}}}\n"))
        .collect();
    env.enqueue_ndjson(&lines);
    env.run();
    assert_eq!(rx.received_on("/e").len(), 1);
    // The first is refused and dead; the key's others wait, visibly; an
    // unkeyed message goes.
    env.enqueue_ndjson(
        "{\"topic\":\"t\",\"account\":\"a\",\"payload\":{\"k\":\"none\",\"n\":0}}\n",
    );
    env.run();
    assert_eq!(rx.received_on("/e").len(), 2);
    assert_eq!(env.count_state("dead"), 1);
    let waiting = env.ok(&["list", "--reason", "ordering"]);
    assert_eq!(
        waiting
            .matches("ordering: behind an earlier message of its key")
            .count(),
        2,
        "{waiting}"
    );
    env.run();
    assert_eq!(rx.received_on("/e").len(), 2, "still blocked");
    assert!(
        env.ok(&["requeue", "--reason", "rejected"])
            .contains("requeued 1 delivery")
    );
    env.run();
    let keyed: Vec<Received> = rx
        .received_on("/e")
        .into_iter()
        .filter(|r| key_and_number(r).0 == "o7")
        .collect();
    assert_eq!(keyed.len(), 4, "the dead one again, then the two behind it");
    assert_in_order_per_key(&keyed, 1, 3);
}

fn a_thousand_messages_over_fifty_keys_arrive_in_order_per_key_with_eight_children(
    backend: Backend,
) {
    let rx = Receiver::start();
    // Every tenth request or so fails: retries interleave with the rest.
    rx.set_default("/e", Reply::Flaky(10));
    let env = Env::on(
        backend,
        "max_children = 8",
        &endpoint(
            "e",
            &rx.url("/e"),
            &["t"],
            "backoff_base = \"10ms\"\nbackoff_cap = \"20ms\"\nmax_attempts = 100",
        ),
    );
    // Published round robin over the keys: key i%50, its n-th message.
    let lines: String = (0..1000)
        .map(|i| {
            let (k, n) = (i % 50, i / 50);
            format!("{{\"topic\":\"t\",\"account\":\"a{k}\",\"ordering_key\":\"k{k}\",\"payload\":{{\"k\":\"k{k}\",\"n\":{n}}}}}\n")
        })
        .collect();
    env.enqueue_ndjson(&lines);
    env.run();
    assert!(
        env.query_i64("SELECT count(*) FROM deliveries WHERE reason = 'ordering'") < 950,
        "a run goes on as keys are released"
    );
    run_until(&env, Duration::from_secs(120), "all delivered", || {
        env.count_state("delivered") == 1000
    });
    let received = rx.received_on("/e");
    assert!(
        received.len() > 1000,
        "some were retried: {}",
        received.len()
    );
    assert_in_order_per_key(&received, 50, 20);
    assert!(rx.max_concurrency() > 1, "keys went in parallel");
}

#[test]
fn bad_expiry_and_ordering_input_is_refused_naming_it_and_nothing_is_written() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    let line =
        |extra: &str| format!("{{\"topic\":\"t\",\"account\":\"a\",\"payload\":{{}}{extra}}}\n");
    for (input, text) in [
        (
            line(",\"ttl\":\"soon\""),
            "line 2: ttl \"soon\" is not a duration",
        ),
        (
            line(",\"ttl\":\"0s\""),
            "line 2: ttl must be longer than 0s",
        ),
        (
            line(",\"ttl\":\"1m\",\"expires_at\":\"2099-01-01T00:00:00Z\""),
            "line 2: give a ttl or an expires_at, not both",
        ),
        (
            line(",\"expires_at\":\"2001-01-01T00:00:00Z\""),
            "line 2: expires_at is not in the future",
        ),
        (
            line(",\"expires_at\":\"tomorrow\""),
            "line 2: expires_at \"tomorrow\" is not a time",
        ),
        (
            line(",\"delay\":\"1h\",\"ttl\":\"1m\""),
            "line 2: it expires before its delay ends",
        ),
        (
            line(",\"ordering_key\":\"\""),
            "line 2: ordering key must not be empty",
        ),
        (
            line(&format!(",\"ordering_key\":\"{}\"", "k".repeat(256))),
            "line 2: ordering key is 256 characters",
        ),
        (
            line(",\"ordering_key\":\"a\\u0007b\""),
            "line 2: ordering key",
        ),
        (line(",\"ordering_key\":7"), "line 2: column"),
    ] {
        let out = env.cronpost_with_stdin(&["enqueue", "--ndjson"], (line("") + &input).as_bytes());
        assert_eq!(out.status.code(), Some(65), "{input}: {}", stderr(&out));
        assert!(stderr(&out).contains(text), "{input}: {}", stderr(&out));
    }
    let out = env.cronpost(&[
        "enqueue",
        "--topic",
        "t",
        "--account",
        "a",
        "--ttl",
        "1m",
        "--expires-at",
        "2099-01-01T00:00:00Z",
        "--data",
        "{}",
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    // A delay the topic's max_age does not outlast.
    let aged = Env::new(
        "",
        &format!(
            "[topics.t]\nmax_age = \"1m\"\n\n{}",
            endpoint("e", &rx.url("/e"), &["t"], "")
        ),
    );
    aged.ok(&["migrate"]);
    let out = aged.cronpost(&[
        "enqueue",
        "--topic",
        "t",
        "--account",
        "a",
        "--delay",
        "5m",
        "--data",
        "{}",
    ]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("delay 5m is not shorter than topic \"t\"'s max_age 1m"),
        "{}",
        stderr(&out)
    );
    assert_eq!(aged.query_i64("SELECT count(*) FROM messages"), 0);
    assert_eq!(env.cronpost(&["stats", "--json"]).status.code(), Some(0));
    assert_eq!(
        env.query_i64("SELECT count(*) FROM messages"),
        0,
        "nothing written"
    );

    // A plain-SQL producer writes expires_at in Unix ms, or nothing.
    let sql = "INSERT INTO messages (topic, account, payload, expires_at) VALUES ('t', 'a', '{}', 'soon')";
    let out = std::process::Command::new("sqlite3")
        .arg(&env.db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("expires_at must be INTEGER"),
        "{}",
        stderr(&out)
    );
    let sql =
        "INSERT INTO messages (topic, account, payload, ordering_key) VALUES ('t', 'a', '{}', '')";
    let out = std::process::Command::new("sqlite3")
        .arg(&env.db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ordering_key must be TEXT of 1 to 255"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM messages"),
        0,
        "nothing written"
    );

    let good = std::fs::read_to_string(&env.config).unwrap();
    for (text, expected) in [
        (
            format!("{good}\n[topics.nope]\nmax_age = \"1h\"\n"),
            "topics.nope names a topic no endpoint subscribes to",
        ),
        (
            format!("{good}\n[topics.t]\nmax_age = \"0s\"\n"),
            "topics.t.max_age must be longer than 0s",
        ),
        (
            format!("{good}\n[topics.t]\nmax_age = \"1h\"\ndiscard = true\n"),
            "unknown field `discard`",
        ),
        (
            good.replace("secret", "on_dead = \"sometimes\"\nsecret"),
            "unknown variant `sometimes`, expected `release` or `block`",
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
fn requeue_leaves_expired_and_waiting_deliveries_alone_unless_named() {
    let rx = Receiver::start();
    // One endpoint saturated for ten minutes (its message expires there),
    // one that refuses the first of a key and blocks the key on it.
    rx.queue("/sat", &[Reply::RetryAfter(429, "600")]);
    rx.queue("/strict", &[Reply::Status(422)]);
    let endpoints = endpoint("sat", &rx.url("/sat"), &["s"], "")
        + &endpoint("strict", &rx.url("/strict"), &["k"], "on_dead = \"block\"");
    let env = Env::new("", &endpoints);
    env.ok(&["enqueue", "--topic", "s", "--account", "a", "--data", "{}"]);
    env.run();
    env.ok(&[
        "enqueue",
        "--topic",
        "s",
        "--account",
        "a",
        "--ttl",
        "1s",
        "--data",
        "{}",
    ]);
    env.enqueue_ndjson(
        &"{\"topic\":\"k\",\"account\":\"a\",\"ordering_key\":\"k\",\"payload\":{}}\n".repeat(2),
    );
    run_until(&env, Duration::from_secs(20), "one expired", || {
        env.query_i64("SELECT count(*) FROM deliveries WHERE reason = 'expired'") == 1
    });
    let waiting = env.query_i64("SELECT id FROM deliveries WHERE reason = 'ordering'");
    let (code, text) = {
        let out = env.cronpost(&["requeue", &format!("d{waiting}")]);
        (out.status.code(), stderr(&out))
    };
    assert_eq!(code, Some(65), "{text}");
    assert!(text.contains("waiting for its ordering key"), "{text}");
    let out = env.cronpost(&["requeue", "--reason", "ordering"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("are not requeued"),
        "{}",
        stderr(&out)
    );

    // All dead letters: the refused one, not the expired one.
    assert!(env.ok(&["requeue"]).contains("requeued 1 delivery"));
    assert_eq!(
        env.query_i64(
            "SELECT count(*) FROM deliveries WHERE state = 'dead' AND reason = 'expired'"
        ),
        1
    );
    // Named by its reason, it goes, its expiry lifted.
    assert!(
        env.ok(&["requeue", "--reason", "expired"])
            .contains("requeued 1 delivery")
    );
    assert_eq!(
        env.query_rows("SELECT d.state, coalesce(d.expires_at, 'none') FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE m.expires_at IS NOT NULL"),
        [["ready", "none"]]
    );
    // A reason of the delayed queue selects delayed deliveries without --state.
    env.run();
    let dry: serde_json::Value = serde_json::from_str(&env.ok(&[
        "requeue",
        "--reason",
        "endpoint_saturated",
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(dry["requeued"], 2, "{dry}");
}
