//! The admin surface: the README's sqlite3 queries through the real shell,
//! list/show/requeue/purge (those also on PostgreSQL), retention, and
//! admins' locks against dispatch.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

on_both_backends!(
    list_filters_in_tables_and_json,
    requeue_redelivers_dead_letters_and_dry_run_changes_nothing,
    dead_letters_requeued_at_a_rate_arrive_at_that_rate_not_in_a_burst,
    dead_letters_have_a_retention_of_their_own,
    dead_letters_are_requeued_by_reason_and_by_when_they_died,
);

fn sqlite3(env: &Env, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .args(["-header", "-column"])
        .arg(&env.db)
        .arg(sql)
        .output()
        .expect("the sqlite3 shell is installed (.ci/run installs it)");
    assert!(out.status.success(), "{sql}: {}", stderr(&out));
    assert!(out.stderr.is_empty(), "{sql}: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// A database made by real runs: delivered, dead, saturated and budget-held deliveries.
fn busy_queue(rx: &Receiver, backend: Backend) -> Env {
    rx.set_default("/gone", Reply::Status(404));
    rx.set_default("/sat", Reply::RetryAfter(429, "600"));
    let endpoints = endpoint("ok", &rx.url("/ok"), &["t"], "")
        + &endpoint("gone", &rx.url("/gone"), &["g"], "")
        + &endpoint("sat", &rx.url("/sat"), &["s"], "max_in_flight = 1");
    let env = Env::on(
        backend,
        "",
        &format!("[account_budget.overrides]\nnoisy = {{ rate = 0.1 }}\n\n{endpoints}"),
    );
    let mut lines = String::new();
    for (topic, account, n) in [
        ("t", "acme", 3),
        ("g", "acme", 2),
        ("s", "globex", 2),
        ("t", "noisy", 3),
    ] {
        for _ in 0..n {
            lines += &format!(
                "{{\"topic\":\"{topic}\",\"account\":\"{account}\",\"payload\":{{\"k\":1}}}}\n"
            );
        }
    }
    env.enqueue_ndjson(&lines);
    env.run();
    env
}

#[test]
fn every_readme_query_runs_in_the_sqlite3_shell_and_answers() {
    let rx = Receiver::start();
    let env = busy_queue(&rx, Backend::Sqlite);
    let queries = readme_queries();
    assert_eq!(queries.len(), 8, "{queries:?}");
    let answers: Vec<String> = queries.iter().map(|q| sqlite3(&env, q)).collect();

    let depth = &answers[0];
    assert!(
        depth.starts_with("endpoint") && depth.contains("oldest_age_s"),
        "{depth}"
    );
    assert!(
        depth
            .lines()
            .any(|l| l.starts_with("gone") && l.contains("dead") && l.contains(" 2 ")),
        "{depth}"
    );
    let dead = &answers[1];
    assert!(
        dead.contains("last_error") && dead.contains("HTTP 404: permanent failure"),
        "{dead}"
    );
    let health = &answers[2];
    let sat = health
        .lines()
        .find(|l| l.starts_with("sat "))
        .expect(health);
    assert!(
        sat.contains("saturated") && sat.contains("HTTP 429"),
        "{health}"
    );
    assert!(
        health
            .lines()
            .any(|l| l.starts_with("ok ") && l.contains(" ok ")),
        "{health}"
    );
    let backlog = &answers[3];
    let noisy = backlog
        .lines()
        .find(|l| l.starts_with("noisy"))
        .expect(backlog);
    assert!(
        noisy.split_whitespace().nth(3) == Some("2"),
        "held_by_budget 2: {backlog}"
    );
    let recent = &answers[4];
    assert!(
        recent.contains("delivered") && recent.contains("dead") && recent.contains("retry"),
        "{recent}"
    );
    assert!(answers[5].contains("delivered"), "{}", answers[5]);
    assert!(answers[6].is_empty(), "nothing unrouted: {}", answers[6]);
}

fn list_filters_in_tables_and_json(backend: Backend) {
    let rx = Receiver::start();
    let env = busy_queue(&rx, backend);
    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        let out = env.ok(&[&["list", "--json"], args].concat());
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    assert_eq!(json(&[]).len(), 10);
    let dead = json(&["--state", "dead"]);
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter()
            .all(|d| d["endpoint"] == "gone" && d["last_status"] == 404 && d["topic"] == "g")
    );
    assert_eq!(json(&["--endpoint", "sat"]).len(), 2);
    assert_eq!(json(&["--account", "noisy", "--state", "delayed"]).len(), 2);
    assert_eq!(json(&["--topic", "t"]).len(), 6);
    assert_eq!(json(&["--topic", "t", "--limit", "2"]).len(), 2);
    let delayed = &json(&["--endpoint", "sat", "--state", "delayed"])[0];
    assert_eq!(delayed["reason"], "endpoint_saturated");

    let table = env.ok(&["list", "--state", "delayed"]);
    let header = table.lines().next().unwrap();
    for column in ["delivery", "message", "uid", "endpoint"] {
        assert!(header.contains(column), "{table}");
    }
    assert!(
        table.contains("account_budget for") && table.contains("(4 deliveries;"),
        "{table}"
    );
    // Both ids and the uid, as `show` takes them.
    let first = &json(&["--state", "delayed"])[0];
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.trim_start().starts_with(&format!("d{} ", first["id"])),
        "{row}"
    );
    assert!(row.contains(first["uid"].as_str().unwrap()), "{row}");
    let out = env.cronpost(&["list", "--state", "lost"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let out = env.cronpost(&["list", "--endpoint", "nosuch"]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown endpoint \"nosuch\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn show_tells_a_messages_whole_story() {
    let rx = Receiver::start();
    let env = busy_queue(&rx, Backend::Sqlite);
    let uid: String = env
        .db()
        .query_row("SELECT uid FROM messages WHERE id = 4", [], |r| r.get(0))
        .unwrap();
    let text = env.ok(&["show", "4"]);
    assert!(
        text.contains(&format!("message 4 ({uid}), found by its message id"))
            && text.contains("topic g"),
        "{text}"
    );
    // A delivery id from `list` finds its message, and says so.
    let delivery: i64 = env
        .db()
        .query_row("SELECT id FROM deliveries WHERE message_id = 4", [], |r| {
            r.get(0)
        })
        .unwrap();
    let text = env.ok(&["show", &format!("d{delivery}")]);
    assert!(
        text.contains(&format!(
            "message 4 ({uid}), found by its delivery d{delivery} to gone"
        )),
        "{text}"
    );
    assert!(
        text.contains("to gone: dead") && text.contains("HTTP 404"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["show", &uid, "--json"])).unwrap();
    assert_eq!(json["id"], 4);
    assert_eq!(json["payload"]["k"], 1);
    let attempts = &json["deliveries"][0]["attempts_log"];
    assert_eq!(attempts[0]["outcome"], "dead");
    assert_eq!(attempts[0]["http_status"], 404);
    for (key, says) in [
        ("999", "no message 999"),
        ("d999", "no delivery d999"),
        ("msg_nope", "no message msg_nope"),
    ] {
        let out = env.cronpost(&["show", key]);
        assert_eq!(out.status.code(), Some(65), "{key}");
        assert!(stderr(&out).contains(says), "{key}: {}", stderr(&out));
    }
}

fn requeue_redelivers_dead_letters_and_dry_run_changes_nothing(backend: Backend) {
    let rx = Receiver::start();
    let env = busy_queue(&rx, backend);
    let dry: serde_json::Value =
        serde_json::from_str(&env.ok(&["requeue", "--endpoint", "gone", "--dry-run", "--json"]))
            .unwrap();
    assert_eq!(
        dry,
        serde_json::json!({"requeued": 2, "dry_run": true, "spread_seconds": 0.0})
    );
    assert_eq!(env.count_state("dead"), 2, "dry run changed nothing");

    rx.set_default("/gone", Reply::Status(200));
    let ids = env
        .query_rows("SELECT id FROM deliveries WHERE state = 'dead' ORDER BY id")
        .concat();
    // Ids that name nothing, or a delivery neither dead nor delayed: an
    // error naming them, and nothing changes.
    let delivered: i64 = env.query_i64("SELECT min(id) FROM deliveries WHERE state = 'delivered'");
    let out = env.cronpost(&[
        "requeue",
        &format!("d{}", ids[0]),
        "17000",
        &delivered.to_string(),
    ]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no delivery d17000"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&format!("d{delivered} (delivered)")),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.count_state("dead"), 2, "nothing changed");
    assert!(
        env.ok(&["requeue", &format!("d{}", ids[0])])
            .contains("requeued 1 delivery")
    );
    assert!(
        env.ok(&["requeue", "--endpoint", "gone"])
            .contains("requeued 1 delivery")
    );
    env.run();
    assert_eq!(env.count_state("dead"), 0);
    assert_eq!(
        rx.received_on("/gone").len(),
        4,
        "each dead letter posted again"
    );
    assert_eq!(env.query_i64("SELECT count(*) FROM deliveries WHERE endpoint = 'gone' AND state = 'delivered' AND attempts = 1"), 2);

    // Delayed deliveries go back too when asked for.
    let n = env.ok(&[
        "requeue",
        "--state",
        "delayed",
        "--account",
        "noisy",
        "--json",
    ]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&n).unwrap()["requeued"],
        2
    );
    for (args, code, text) in [
        (
            &["requeue", "--endpoint", "nope"][..],
            65,
            "unknown endpoint \"nope\"",
        ),
        (
            &["requeue", "--state", "delivered"][..],
            64,
            "[possible values: dead, delayed]",
        ),
    ] {
        let out = env.cronpost(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(text), "{}", stderr(&out));
    }
}

fn dead_letters_are_requeued_by_reason_and_by_when_they_died(backend: Backend) {
    let rx = Receiver::start();
    rx.set_default("/gone", Reply::Status(410));
    rx.set_default("/down", Reply::Status(500));
    let endpoints = endpoint("gone", &rx.url("/gone"), &["g"], "")
        + &endpoint("down", &rx.url("/down"), &["d"], "max_attempts = 1");
    let env = Env::on(backend, "", &endpoints);
    env.enqueue_ndjson(&"{\"topic\":\"g\",\"account\":\"a\",\"payload\":{}}\n".repeat(2));
    env.enqueue_ndjson(&"{\"topic\":\"d\",\"account\":\"a\",\"payload\":{}}\n".repeat(3));
    env.run();
    assert_eq!(
        env.query_rows("SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY reason"),
        [["attempts_exhausted", "3"], ["rejected", "2"]]
    );
    let listed: serde_json::Value = serde_json::from_str(
        &env.ok(&["list", "--state", "dead", "--reason", "rejected", "--json"]),
    )
    .unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed.iter().all(|d| d["reason"] == "rejected"),
        "{listed:?}"
    );
    let requeued = |args: &[&str]| -> i64 {
        let mut all = vec!["requeue", "--dry-run", "--json"];
        all.extend_from_slice(args);
        let out: serde_json::Value = serde_json::from_str(&env.ok(&all)).unwrap();
        out["requeued"].as_i64().unwrap()
    };
    assert_eq!(requeued(&["--reason", "attempts_exhausted"]), 3);
    assert_eq!(
        requeued(&["--reason", "attempts_exhausted", "--since", "1h"]),
        3
    );
    // Died more than a second ago, once they are.
    wait_until(Duration::from_secs(10), "a second to pass", || {
        requeued(&["--since", "1s"]) == 0
    });
    assert_eq!(requeued(&["--reason", "rejected", "--since", "1h"]), 2);

    rx.set_default("/down", Reply::Status(200));
    assert!(
        env.ok(&["requeue", "--reason", "attempts_exhausted"])
            .contains("requeued 3 deliveries")
    );
    env.run();
    assert_eq!(env.count_state("delivered"), 3);
    assert_eq!(env.count_state("dead"), 2, "the rejected ones stay dead");

    for (args, text) in [
        (
            &["requeue", "--reason", "bogus"][..],
            "[possible values: scheduled,",
        ),
        (&["requeue", "--since", "5"][..], "5 needs a unit"),
        (
            &["requeue", "--unroutable", "--reason", "rejected"][..],
            "cannot be used with",
        ),
    ] {
        let out = env.cronpost(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(text), "{args:?}: {}", stderr(&out));
    }
}

/// Inserts `n` delivered deliveries (and messages), last changed 30 days ago.
fn old_history(env: &Env, n: i64) {
    env.ok(&["migrate"]);
    let db = rusqlite::Connection::open(&env.db).unwrap();
    let old = cronpost::store::now_ms() - 30 * 24 * 3600 * 1000;
    db.execute_batch(&format!(
        "BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n})
         INSERT INTO messages (topic, account, payload, created_at, routed_at) SELECT 't', 'old', '{{}}', {old}, {old} FROM n;
         INSERT INTO deliveries (message_id, endpoint, account, state, priority, not_before, created_at, updated_at, attempts)
           SELECT id, 'hook', 'old', 'delivered', 0, {old}, {old}, {old}, 1 FROM messages WHERE account = 'old';
         INSERT INTO attempts (delivery_id, number, pid, lease_owner, started_at, finished_at, outcome)
           SELECT id, 1, 1, 'x', {old}, {old}, 'delivered' FROM deliveries WHERE account = 'old';
         COMMIT;"
    ))
    .unwrap();
}

#[test]
fn purge_removes_a_hundred_thousand_delivered_rows_in_batches_while_a_run_delivers() {
    let rx = Receiver::start();
    let env = Env::new(
        "max_children = 4",
        &endpoint("hook", &rx.url("/hook"), &["t"], ""),
    );
    // The run's own retention would race the purge command for the same rows.
    env.prepend_config("retention = \"3650d\"");
    old_history(&env, 100_000);
    let fresh: String = (0..200)
        .map(|i| format!("{{\"topic\":\"t\",\"account\":\"new{i}\",\"payload\":{{}}}}\n"))
        .collect();
    env.enqueue_ndjson(&fresh);

    let purge = env
        .command(&["purge", "--older-than", "7d", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    env.run();
    let out = purge.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["deliveries"], 100_000);
    assert_eq!(report["messages"], 100_000);
    assert!(
        report["batches"].as_u64().unwrap() >= 50,
        "bounded batches of 2,000: {report}"
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM attempts WHERE lease_owner = 'x'"),
        0,
        "attempts went with them"
    );
    run_until(
        &env,
        Duration::from_secs(60),
        "the fresh messages delivered",
        || env.count_state("delivered") == 200,
    );
    assert_eq!(env.query_i64("SELECT count(*) FROM deliveries"), 200);
}

fn dead_letters_have_a_retention_of_their_own(backend: Backend) {
    let rx = Receiver::start();
    rx.set_default("/gone", Reply::Status(410));
    let env = Env::on(
        backend,
        "",
        &(endpoint("gone", &rx.url("/gone"), &["g"], "")
            + &endpoint("ok", &rx.url("/ok"), &["t"], "")),
    );
    env.prepend_config("dead_retention = \"1s\"");
    env.enqueue("g", "acme", "{}");
    env.enqueue("t", "acme", "{}");
    env.run();
    assert_eq!(
        (env.count_state("dead"), env.count_state("delivered")),
        (1, 1)
    );
    let died = env.query_i64("SELECT updated_at FROM deliveries WHERE state = 'dead'");
    wait_until(
        Duration::from_secs(10),
        "the dead letter is over 1 s old",
        || cronpost::store::now_ms() > died + 1_000,
    );
    let out = env.cronpost(&["run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("purged 1 dead letter older than 1s"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.count_state("dead"), 0);
    // Its message, left with no delivery, is history: kept for `retention`.
    assert_eq!(
        env.query_i64("SELECT count(*) FROM messages WHERE topic = 'g'"),
        1
    );
    assert_eq!(
        env.count_state("delivered"),
        1,
        "delivered history keeps its 7 days"
    );
}

#[test]
fn runs_purge_delivered_history_past_retention_a_bounded_amount_at_a_time() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("hook", &rx.url("/hook"), &["t"], ""));
    env.prepend_config("retention = \"7d\"");
    old_history(&env, 12_000);
    env.enqueue("t", "fresh", "{}");
    env.run();
    assert_eq!(
        env.query_i64("SELECT count(*) FROM deliveries WHERE account = 'old'"),
        2_000,
        "10,000 per run"
    );
    env.run();
    assert_eq!(
        env.query_i64("SELECT count(*) FROM deliveries WHERE account = 'old'"),
        0
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM messages WHERE account = 'old'"),
        0
    );
    assert_eq!(
        env.query_i64(
            "SELECT count(*) FROM deliveries WHERE account = 'fresh' AND state = 'delivered'"
        ),
        1,
        "recent history stays"
    );
}

#[test]
fn a_long_admin_read_does_not_stop_a_run() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("hook", &rx.url("/hook"), &["t"], ""));
    env.enqueue("t", "acme", "{}");
    env.ok(&["migrate"]);
    // sqlite3 holds a read transaction open until we close its stdin.
    let (mut shell, stdin) = env.sqlite3_holding(
        "BEGIN; SELECT count(*) FROM deliveries; SELECT 'reading';",
        "reading",
    );

    env.run();
    assert_eq!(
        rx.received_on("/hook").len(),
        1,
        "delivered while the read transaction is open"
    );
    assert_eq!(env.count_state("delivered"), 1);
    drop(stdin);
    assert!(shell.wait().unwrap().success());
}

#[test]
fn an_admin_write_lock_makes_dispatch_wait_then_fail_clearly_losing_nothing() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("hook", &rx.url("/hook"), &["t"], ""));
    env.prepend_config("busy_timeout = \"500ms\"");
    env.enqueue("t", "acme", "{}");
    let (mut shell, stdin) = env.sqlite3_holding("BEGIN IMMEDIATE; SELECT 'locked';", "locked");

    for args in [
        &["run"][..],
        &["enqueue", "--topic", "t", "--account", "a", "--data", "{}"],
    ] {
        let out = env.cronpost(args);
        assert_eq!(out.status.code(), Some(75), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("database is locked"),
            "{}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(env.db.to_str().unwrap()),
            "names the file: {}",
            stderr(&out)
        );
    }
    drop(stdin);
    assert!(shell.wait().unwrap().success());

    env.run();
    assert_eq!(
        env.count_state("delivered"),
        1,
        "the message enqueued before the lock is delivered"
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM messages"),
        1,
        "the refused enqueue wrote nothing"
    );
    assert!(rx.received_on("/hook").len() == 1);
}

#[test]
fn a_backup_taken_during_a_run_is_consistent_and_a_restored_copy_delivers_what_was_pending() {
    use std::os::unix::fs::MetadataExt;
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Delayed(Duration::from_millis(40), 200));
    // Short leases, so that those held when the copy is taken expire soon.
    let env_for = |rx: &Receiver| {
        let env = Env::new(
            "max_children = 2\nchild_deadline = \"2s\"\nlease_timeout = \"4s\"",
            &endpoint("slow", &rx.url("/slow"), &["t"], ""),
        );
        env.prepend_config("busy_timeout = \"1s\"");
        env
    };
    let env = env_for(&rx);
    env.enqueue_one_per_account("t", 100);

    // The backup, taken while a run delivers.
    let mut running = env.command(&["run"]).stderr(Stdio::null()).spawn().unwrap();
    wait_until(Duration::from_secs(60), "the run has begun", || {
        rx.received_on("/slow").len() >= 10
    });
    let backup = env.dir.path().join("backup.db");
    let out = env.cronpost(&["backup", backup.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["bytes"], std::fs::metadata(&backup).unwrap().len());
    assert!(running.wait().unwrap().success());
    assert_eq!(rx.received_on("/slow").len(), 100);

    // Whole, private as the database, and taken mid-run.
    let (db_meta, copy_meta) = (
        std::fs::metadata(&env.db).unwrap(),
        std::fs::metadata(&backup).unwrap(),
    );
    assert_eq!(copy_meta.mode() & 0o7777, db_meta.mode() & 0o7777);
    assert_eq!(copy_meta.gid(), db_meta.gid());
    let copy = rusqlite::Connection::open(&backup).unwrap();
    let check: String = copy
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let pending: i64 = copy
        .query_row(
            "SELECT count(*) FROM deliveries WHERE state != 'delivered'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        (1..100).contains(&pending),
        "{pending} pending: the copy was taken mid-run"
    );
    drop(copy);
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A backup never overwrites, and a missing database is not backed up.
    let before = std::fs::read(&backup).unwrap();
    let out = env.cronpost(&["backup", backup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(73));
    assert!(
        stderr(&out).contains(&format!("backup {} exists", backup.display())),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&backup).unwrap(), before);
    let nowhere = env_for(&rx);
    let out = nowhere.cronpost(&["backup", backup.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not exist: nothing to back up"),
        "{}",
        stderr(&out)
    );
    assert!(!nowhere.db.exists(), "no database was created");

    // Restored as the README says, the copy delivers what was pending
    // (leased at the time: once its lease expires).
    let rx2 = Receiver::start();
    rx2.set_default("/slow", Reply::Status(200));
    let restored = env_for(&rx2);
    std::fs::copy(&backup, &restored.db).unwrap();
    run_until(
        &restored,
        Duration::from_secs(60),
        "all pending delivered",
        || restored.count_state("delivered") == 100,
    );
    assert_eq!(rx2.received_on("/slow").len() as i64, pending);
}

fn dead_letters_requeued_at_a_rate_arrive_at_that_rate_not_in_a_burst(backend: Backend) {
    let rx = Receiver::start();
    rx.set_default("/hook", Reply::Status(410));
    let env = Env::on(
        backend,
        "max_children = 4\nmax_runtime = \"12s\"",
        &endpoint("hook", &rx.url("/hook"), &["t"], ""),
    );
    env.enqueue_one_per_account("t", 500);
    run_until(&env, Duration::from_secs(120), "500 dead letters", || {
        env.count_state("dead") == 500
    });

    // Bad rates are refused, naming the flag.
    for bad in ["0/s", "5/d", "fast"] {
        let out = env.cronpost(&["requeue", "--rate", bad]);
        assert_eq!(out.status.code(), Some(64), "{bad}");
        assert!(stderr(&out).contains("--rate"), "{}", stderr(&out));
    }
    let out = env.ok(&["requeue", "--rate", "50/s", "--limit", "10", "--dry-run"]);
    assert!(
        out.contains("would requeue 10 deliveries, spread over"),
        "{out}"
    );

    // The endpoint is back: 500 at 50/s, the first now, the last ~10 s on.
    rx.set_default("/hook", Reply::Status(200));
    let before = std::time::Instant::now();
    let out = env.ok(&["requeue", "--rate", "50/s"]);
    assert!(
        out.contains("requeued 500 deliveries, spread over 9s"),
        "{out}"
    );
    assert!(
        env.command(&["run", "--linger"])
            .status()
            .unwrap()
            .success()
    );
    run_until(&env, Duration::from_secs(60), "all delivered", || {
        env.count_state("delivered") == 500
    });
    let mut arrivals: Vec<Duration> = rx
        .received_on("/hook")
        .iter()
        .filter(|r| r.status == Some(200))
        .map(|r| r.at.duration_since(before))
        .collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 500);
    // By the k-th arrival at least k slots of 20 ms had come due: a lower
    // bound that holds however slow the machine (a few ms for the clocks).
    for (k, at) in arrivals.iter().enumerate() {
        let due = Duration::from_millis(20 * k as u64);
        assert!(
            *at + Duration::from_millis(5) >= due,
            "arrival {k} at {at:?}, before its slot at {due:?}"
        );
    }
    assert!(arrivals[499] >= Duration::from_millis(9_975));
}
