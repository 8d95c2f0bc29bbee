//! Delivery semantics end to end, with the real binary, real children and a
//! real receiver on 127.0.0.1: expiry (a message's time to live, a topic's
//! max_age) and ordering keys; on SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use common::*;

on_both_backends!(a_message_held_past_its_time_to_live_is_never_posted_and_shows_as_expired,);

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
        env.query_i64("SELECT count(*) FROM deliveries WHERE state = 'dead' AND reason = 'expired'")
            == 1
    });
    assert_eq!(rx.received_on("/sat").len(), 1, "never posted");
    // The topic that discards: its delivery is gone, counted.
    assert_eq!(env.query_i64("SELECT count(*) FROM deliveries"), 2);
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

#[test]
fn bad_expiry_input_is_refused_naming_it_and_nothing_is_written() {
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
