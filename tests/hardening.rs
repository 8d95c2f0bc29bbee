//! The findings of a code review, one test each (issue "Hardening"), with
//! the real binary, real children and real receivers on 127.0.0.1: each
//! failed on the code before its fix.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LIMIT: Duration = Duration::from_secs(60);

fn code(out: &std::process::Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

// ------------------------------------------------- 1. https fire-and-forget

/// A TLS server on 127.0.0.1 with a certificate for 127.0.0.1 from a CA of
/// its own (written as a PEM file for SSL_CERT_FILE), which reads each
/// request slowly and records how many bytes it got.
struct SlowTlsReceiver {
    port: u16,
    ca_file: std::path::PathBuf,
    got: Arc<Mutex<Vec<usize>>>,
}

impl SlowTlsReceiver {
    fn start(dir: &std::path::Path, chunk: usize, pause: Duration) -> SlowTlsReceiver {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();

        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let record = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(4) {
                let (config, record) = (config.clone(), record.clone());
                std::thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, stream.unwrap());
                    let mut total = 0;
                    let mut buf = vec![0u8; chunk];
                    loop {
                        match tls.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => total += n,
                        }
                        std::thread::sleep(pause);
                    }
                    record.lock().unwrap().push(total);
                });
            }
        });
        SlowTlsReceiver { port, ca_file, got }
    }
}

#[test]
fn https_fire_and_forget_is_handed_over_only_once_the_whole_request_is_written() {
    let dir = tempfile::tempdir().unwrap();
    // 2 MB at ~1 MB/s: the write takes longer than connect_timeout plus
    // answer_window (2.2 s), the bound that used to cut it short.
    let receiver = SlowTlsReceiver::start(dir.path(), 16 * 1024, Duration::from_millis(16));
    let env = Env::new(
        "child_deadline = \"20s\"\nlease_timeout = \"30s\"",
        &endpoint(
            "tls",
            &format!("https://127.0.0.1:{}/hook", receiver.port),
            &["t"],
            "",
        ),
    );
    env.prepend_config("max_payload_bytes = 4000000");
    let payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(2_000_000));
    let out = env.cronpost_with_stdin(
        &["enqueue", "--topic", "t", "--account", "a"],
        payload.as_bytes(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let run = env
        .command(&["run"])
        .env("SSL_CERT_FILE", &receiver.ca_file)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
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
        ("delivered", "handed_over")
    );
    wait_until(LIMIT, "the receiver is done reading", || {
        !receiver.got.lock().unwrap().is_empty()
    });
    let got = receiver.got.lock().unwrap()[0];
    assert!(
        got > payload.len(),
        "handed over means all of it arrived: {got} of {} bytes (and the head)",
        payload.len()
    );
}

// ------------------------------------------------- 2. bad plain-SQL rows

#[test]
fn rows_of_the_wrong_type_are_refused_at_insert_or_dead_lettered_and_delivery_goes_on() {
    let rx = Receiver::start();
    let env = Env::new(
        "max_children = 2",
        &endpoint("e", &rx.url("/e"), &["t"], ""),
    );
    env.ok(&["migrate"]);
    let db = rusqlite::Connection::open(&env.db).unwrap();
    // A bad INSERT fails at once, with a message naming the columns.
    for (sql, says) in [
        (
            "INSERT INTO messages (topic, account, payload) VALUES ('t', 'a', X'7b7d')",
            "must be TEXT",
        ),
        (
            "INSERT INTO messages (topic, account, payload) VALUES ('t', X'61', '{}')",
            "must be TEXT",
        ),
        (
            "INSERT INTO messages (topic, account, payload, priority) VALUES ('t', 'a', '{}', 'high')",
            "must be INTEGER",
        ),
        (
            "INSERT INTO messages (topic, account, payload, available_at) VALUES ('t', 'a', '{}', '2027-01-01')",
            "must be INTEGER",
        ),
        (
            "INSERT INTO messages (topic, account, payload) VALUES ('t' || char(10), 'a', '{}')",
            "control characters",
        ),
        (
            "INSERT INTO messages (topic, account, payload, uid) VALUES ('t', 'a', '{}', 'not ok')",
            "uid must be",
        ),
    ] {
        let err = db.execute(sql, []).unwrap_err().to_string();
        assert!(err.contains(says), "{sql}: {err}");
    }
    // '5' for priority is stored as the integer 5 (column affinity): fine.
    db.execute(
        "INSERT INTO messages (topic, account, payload, priority) VALUES ('t', 'good', '{}', '5')",
        [],
    )
    .unwrap();

    // Rows from before the checks (here: written with the triggers off)
    // that cannot be decoded are dead-lettered, and do not stop the rest.
    db.execute_batch(
        "DROP TRIGGER messages_text_columns;
         INSERT INTO messages (topic, account, payload, priority) VALUES ('t', X'626164', '{}', 100);
         INSERT INTO messages (topic, account, payload, priority) VALUES ('t', 'bad-payload', X'7b7d', 100);",
    )
    .unwrap();
    drop(db);
    let out = env.cronpost(&["run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(rx.received_on("/e").len(), 1, "the good message went");
    assert_eq!(env.count_state("dead"), 2, "{}", stderr(&out));
    let errors: Vec<String> = env
        .db()
        .prepare("SELECT last_error FROM deliveries WHERE state = 'dead'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        errors.iter().all(|e| e.contains("cannot be decoded")),
        "{errors:?}"
    );
    let forked = env.query_i64("SELECT forked FROM runs ORDER BY id DESC LIMIT 1");
    assert!(forked <= 4, "{forked} children for three deliveries");
}

#[test]
fn after_ten_children_fail_in_a_row_the_run_stops_forking_and_says_why() {
    let rx = Receiver::start();
    let env = Env::new(
        "max_children = 2",
        &endpoint("e", &rx.url("/e"), &["t"], ""),
    );
    let lines: String = (0..200)
        .map(|i| format!("{{\"topic\":\"t\",\"account\":\"a\",\"payload\":{{\"n\":{i}}}}}\n"))
        .collect();
    env.enqueue_ndjson(&lines);
    env.ok(&["migrate"]);
    // Every lease fails: a trigger refuses to lease.
    rusqlite::Connection::open(&env.db)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER no_leases BEFORE UPDATE OF state ON deliveries WHEN NEW.state = 'leased'
             BEGIN SELECT RAISE(ABORT, 'leasing is broken'); END;",
        )
        .unwrap();
    let out = env.cronpost(&["run"]);
    assert_eq!(code(&out), 70, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stopped forking after 10 children in a row failed"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("leasing is broken"),
        "{}",
        stderr(&out)
    );
    let forked = env.query_i64("SELECT forked FROM runs ORDER BY id DESC LIMIT 1");
    assert!((10..=12).contains(&forked), "forked {forked}");
    assert_eq!(env.count_state("ready"), 200, "nothing lost");
}

// ------------------------------------------------- 4. jitter

#[test]
fn full_jitter_differs_between_the_children_of_one_run() {
    let rx = Receiver::start();
    rx.set_default("/e", Reply::Status(500));
    let env = Env::new(
        "max_children = 8",
        &endpoint(
            "e",
            &rx.url("/e"),
            &["t"],
            "backoff_base = \"1000s\"\nbackoff_cap = \"1000s\"",
        ),
    );
    let lines: String = (0..8)
        .map(|i| format!("{{\"topic\":\"t\",\"account\":\"a{i}\",\"payload\":{{}}}}\n"))
        .collect();
    env.enqueue_ndjson(&lines);
    env.run();
    let delays: Vec<i64> = env
        .db()
        .prepare("SELECT not_before - updated_at FROM deliveries WHERE reason = 'retry_backoff'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(delays.len(), 8);
    let distinct: HashSet<i64> = delays.iter().copied().collect();
    assert_eq!(distinct.len(), 8, "one draw per child: {delays:?}");
    // Uniform below 1,000 s: eight draws span a good part of it.
    let spread = delays.iter().max().unwrap() - delays.iter().min().unwrap();
    assert!(spread > 200_000, "{delays:?}");
}

// ------------------------------------------------- 5. a child bounds itself

#[test]
fn an_orphaned_child_ends_at_its_own_deadline_before_its_lease_can_expire() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Hang);
    let env = Env::new(
        "child_deadline = \"3s\"\nlease_timeout = \"9s\"",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "mode = \"confirm\"\ntimeout = \"60s\"",
        ),
    );
    env.enqueue("t", "a", "{}");
    let mut run = env.command(&["run"]).stderr(Stdio::null()).spawn().unwrap();
    wait_until(LIMIT, "the child posts", || {
        rx.received_on("/slow").len() == 1
    });
    let child: i32 = env.query_i64("SELECT pid FROM attempts") as i32;
    kill(Pid::from_raw(run.id() as i32), Signal::SIGKILL).unwrap();
    run.wait().unwrap();
    let killed = Instant::now();
    wait_until(LIMIT, "the orphan is gone", || exited(child));
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "it outlived its deadline: {:?}",
        killed.elapsed()
    );
    // It recorded its own outcome (a retry) before its deadline.
    assert_eq!(env.count_state("leased"), 0);
}

// ------------------------------------------------- 6. removed endpoints

#[test]
fn deliveries_of_an_endpoint_removed_from_the_config_are_parked_shown_and_purged() {
    let rx = Receiver::start();
    let kept = endpoint("kept", &rx.url("/kept"), &["t"], "");
    let env = Env::new(
        "max_messages = 1",
        &(kept.clone() + &endpoint("gone", &rx.url("/gone"), &["u"], "")),
    );
    let lines: String = (0..50)
        .map(|i| {
            format!(
                "{{\"topic\":\"u\",\"account\":\"a\",\"payload\":{{}},\"priority\":{}}}\n",
                i % 3
            )
        })
        .collect();
    env.enqueue_ndjson(&lines);
    // One run routes the 50 and delivers one; then the endpoint leaves.
    env.run();
    assert_eq!(rx.received_on("/gone").len(), 1);
    env.write_config(&format!("database = \"q.db\"\n\n[run]\n\n{kept}"));
    env.enqueue("t", "a", "{}");
    env.run();
    // The first child parks all 49 at once (the children forked beside it
    // find nothing); none is ever leased.
    let forked = env.query_i64("SELECT forked FROM runs ORDER BY id DESC LIMIT 1");
    assert!(
        forked <= 4,
        "forked {forked}: at most max_children, not one per parked delivery"
    );
    assert_eq!(rx.received_on("/kept").len(), 1);
    assert_eq!(
        env.query_i64("SELECT count(*) FROM deliveries WHERE reason = 'endpoint_removed'"),
        49
    );
    assert_eq!(
        env.query_i64("SELECT max(attempts) FROM deliveries WHERE reason = 'endpoint_removed'"),
        0,
        "never tried"
    );
    let stats = env.ok(&["stats"]);
    assert!(
        stats.contains("endpoint gone is not in the config: 49 deliveries parked"),
        "{stats}"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["stats", "--json"])).unwrap();
    assert_eq!(json["orphaned"][0]["endpoint"], "gone");
    assert_eq!(json["orphaned"][0]["deliveries"], 49);
    // An admin purges them.
    let dry = env.ok(&["purge", "--orphaned", "--dry-run"]);
    assert!(dry.contains("would purge 49"), "{dry}");
    let purged = env.ok(&["purge", "--orphaned"]);
    assert!(purged.contains("purged 49"), "{purged}");
    assert_eq!(
        env.query_i64(
            "SELECT count(*) FROM deliveries WHERE endpoint = 'gone' AND state != 'delivered'"
        ),
        0
    );
}

// ------------------------------------------------- 7. URL credentials

#[test]
fn url_credentials_and_tokens_never_show_and_userinfo_is_sent_as_basic_auth() {
    let rx = Receiver::start();
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::new(
        "",
        &(endpoint(
            "auth",
            &rx.url("/in?token=tok-SECRET-1")
                .replace("http://", "http://bob:pw-SECRET-2@"),
            &["t"],
            "",
        ) + &endpoint(
            "down",
            &format!("http://carol:pw-SECRET-3@127.0.0.1:{refused}/x?token=tok-SECRET-4"),
            &["t"],
            "",
        )),
    );
    env.enqueue("t", "a", "{}");
    let mut seen = String::new();
    for args in [
        &["run"][..],
        &["check-config"],
        &["stats"],
        &["stats", "--json"],
        &["list", "--json"],
        &["show", "1", "--json"],
    ] {
        let out = env.command(args).env("RUST_LOG", "debug").output().unwrap();
        seen += &String::from_utf8_lossy(&out.stdout);
        seen += &stderr(&out);
    }
    seen += &sqlite3_dump(&env);
    assert!(!seen.contains("SECRET"), "a credential leaked:\n{seen}");
    assert!(seen.contains("http://***@127.0.0.1"), "{seen}");
    let got = rx.received_on("/in?token=tok-SECRET-1");
    assert_eq!(got.len(), 1);
    // base64("bob:pw-SECRET-2")
    assert_eq!(got[0].header("authorization"), "Basic Ym9iOnB3LVNFQ1JFVC0y");
}

/// Every text column of the tables that hold errors, as the sqlite3 shell prints them.
fn sqlite3_dump(env: &Env) -> String {
    let out = Command::new("sqlite3")
        .arg(&env.db)
        .arg("SELECT error FROM attempts; SELECT last_error FROM deliveries; SELECT last_error FROM endpoint_health;")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ------------------------------------------------- 8. durable enqueue

#[test]
fn an_accepted_enqueue_is_synced_to_disk_before_cronpost_says_so() {
    // strace counts the syncs; another connection stays open, so the
    // enqueue's close is not the last one (which checkpoints and syncs
    // whatever the setting).
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    env.ok(&["migrate"]);
    let held = rusqlite::Connection::open(&env.db).unwrap();
    held.query_row("SELECT count(*) FROM messages", [], |r| r.get::<_, i64>(0))
        .unwrap();
    // A first enqueue starts the WAL (its header is synced whatever the
    // setting); the traced one appends to it.
    env.enqueue("t", "a", "{}");
    let trace = env.path().join("strace.out");
    let out = Command::new("strace")
        .args(["-f", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_cronpost"))
        .args(["enqueue", "--topic", "t", "--account", "a", "--data", "{}"])
        .env("CRONPOST_CONFIG", &env.config)
        .output()
        .expect("strace is installed (.ci/test installs it)");
    assert!(out.status.success(), "{}", stderr(&out));
    let syncs = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| l.contains("sync(") && !l.contains("resumed"))
        .count();
    assert!(syncs >= 1, "the commit was synced: {syncs} syncs");
    drop(held);
}

// ------------------------------------------------- 9. ids

#[test]
fn message_uids_are_unique_and_in_the_standard_webhooks_alphabet() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    env.ok(&["migrate"]);
    let db = rusqlite::Connection::open(&env.db).unwrap();
    db.execute(
        "INSERT INTO messages (uid, topic, account, payload) VALUES ('msg_abc', 't', 'a', '{}')",
        [],
    )
    .unwrap();
    let dup = db
        .execute("INSERT INTO messages (uid, topic, account, payload) VALUES ('msg_abc', 't', 'a', '{}')", [])
        .unwrap_err();
    assert!(dup.to_string().contains("UNIQUE"), "{dup}");
    for bad in ["msg abc", "msg/abc", "é", ""] {
        let err = db
            .execute(
                "INSERT INTO messages (uid, topic, account, payload) VALUES (?1, 't', 'a', '{}')",
                [bad],
            )
            .unwrap_err();
        assert!(err.to_string().contains("uid must be"), "{bad:?}: {err}");
    }
    drop(db);
    env.run();
    let got = rx.received_on("/e");
    assert_eq!(got[0].header("webhook-id"), "msg_abc");
}

// ------------------------------------------------- 10. secret rotation

#[test]
fn an_endpoint_with_two_secrets_signs_with_both_and_the_receiver_checks_file_env_and_time() {
    let rx = Receiver::start();
    let env = Env::new(
        "",
        &endpoint("e", &rx.url("/e"), &["t"], "").replace(
            &format!("secret = \"{SECRET}\""),
            "secret = [\"whsec_bmV3IHNlY3JldA\", \"old secret\"]",
        ),
    );
    env.enqueue("t", "a", "{}");
    env.run();
    let got = &rx.received_on("/e")[0];
    let header = got.header("webhook-signature");
    assert_eq!(header.split(' ').count(), 2, "{header}");
    let ts: i64 = got.header("webhook-timestamp").parse().unwrap();
    for key in ["whsec_bmV3IHNlY3JldA", "old secret"] {
        let secret = cronpost::config::Secret::parse(key).unwrap();
        assert!(cronpost::signature::verify(
            &secret,
            got.header("webhook-id"),
            ts,
            &got.body,
            header
        ));
    }
    for bad in ["secret = []", "secret = \"whsec_\""] {
        env.write_config(
            &std::fs::read_to_string(&env.config)
                .unwrap()
                .replace("secret = [\"whsec_bmV3IHNlY3JldA\", \"old secret\"]", bad),
        );
        let out = env.cronpost(&["check-config"]);
        assert_eq!(code(&out), 78, "{bad}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("endpoints.e.secret"),
            "{}",
            stderr(&out)
        );
        env.write_config(
            &std::fs::read_to_string(&env.config)
                .unwrap()
                .replace(bad, "secret = [\"whsec_bmV3IHNlY3JldA\", \"old secret\"]"),
        );
    }
    // The receiver takes its secret from a file or the environment, never argv.
    let out = env.cronpost(&["receive", "--secret", "x"]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    let secret_file = env.path().join("secret");
    std::fs::write(&secret_file, "old secret\n").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut receive = env
        .command(&[
            "receive",
            "--port",
            "0",
            "--count",
            "3",
            "--reject-invalid",
            "--secret-file",
        ])
        .arg(&secret_file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(receive.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let post = |ts: i64, signature: &str| -> u16 {
        let addr = url.strip_prefix("http://").unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /r HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nwebhook-id: msg_1\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {signature}\r\nconnection: close\r\n\r\n{{}}"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer[9..12].parse().unwrap()
    };
    let secret = cronpost::config::Secret::parse("old secret").unwrap();
    let now = cronpost::store::now_ms() / 1000;
    let sign = |ts| cronpost::signature::sign(std::slice::from_ref(&secret), "msg_1", ts, b"{}");
    assert_eq!(post(now, &sign(now)), 200);
    assert_eq!(
        post(now - 600, &sign(now - 600)),
        401,
        "outside the 5 min tolerance"
    );
    assert_eq!(post(now, "v1,AAAA"), 401);
    assert!(receive.wait().unwrap().success());
}

// ------------------------------------------------- 11. local users

#[test]
fn other_local_users_can_neither_hold_a_slot_nor_redirect_the_metrics_file() {
    let rx = Receiver::start();
    let env = Env::new(
        "max_children = 2",
        &endpoint("e", &rx.url("/e"), &["t"], ""),
    );
    env.prepend_config("metrics_file = \"m.prom\"");
    env.enqueue("t", "a", "{}");
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A symlink where the metrics go: replaced, its target untouched.
    let target = env.path().join("victim");
    std::fs::write(&target, "keep me").unwrap();
    std::os::unix::fs::symlink(&target, env.path().join("m.prom")).unwrap();
    env.run();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    assert!(
        !std::fs::symlink_metadata(env.path().join("m.prom"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // nobody cannot open a slot file to lock it.
    let slots = env.path().join("q.db.slots");
    let slot = std::fs::read_dir(&slots)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::metadata(&slot).unwrap().permissions().mode() & 0o007,
        0
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "flock",
            "-n",
        ])
        .arg(&slot)
        .arg("true")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nobody locked a slot: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
}

// ------------------------------------------------- 12. false endpoint signals

#[test]
fn children_killed_at_the_end_of_a_stop_grace_are_retried_and_are_not_saturation() {
    // A stop: the children still hanging at the end of the grace period are
    // killed and retried, and their endpoint is not marked saturated.
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Hang);
    let env = Env::new(
        "max_children = 2\nstop_grace = \"300ms\"\nchild_deadline = \"20s\"\nlease_timeout = \"30s\"",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "mode = \"confirm\"\ntimeout = \"15s\"",
        ),
    );
    env.enqueue("t", "a", "{}");
    env.enqueue("t", "b", "{}");
    let run = env
        .command(&["run"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(LIMIT, "children posting", || {
        rx.received_on("/slow").len() == 2
    });
    kill(Pid::from_raw(run.id() as i32), Signal::SIGTERM).unwrap();
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("killed at the end of the stop grace period"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM endpoint_health WHERE failures > 0"),
        0,
        "a stop is not saturation"
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM attempts WHERE outcome = 'child_died'"),
        2
    );
}

#[test]
fn a_bookkeeping_error_stops_the_forking_but_lets_the_children_in_flight_finish() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Delayed(Duration::from_secs(3), 200));
    let env = Env::new(
        "max_children = 3\nchild_deadline = \"20s\"\nlease_timeout = \"30s\"",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "mode = \"confirm\"\ntimeout = \"15s\"",
        ),
    );
    env.prepend_config("busy_timeout = \"500ms\"");
    for account in ["a", "b", "c"] {
        env.enqueue("t", account, "{}");
    }
    let log = env.path().join("run.log");
    let mut run = env
        .command(&["run"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until(LIMIT, "children posting", || {
        rx.received_on("/slow").len() == 3
    });
    let pids: Vec<i32> = env
        .db()
        .prepare("SELECT pid FROM attempts ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    // Hold the write lock, then kill one child: settling its lease fails.
    let (_shell, lock) = env.sqlite3_holding("BEGIN IMMEDIATE; SELECT 'locked';", "locked");
    kill(Pid::from_raw(pids[0]), Signal::SIGKILL).unwrap();
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(LIMIT, "the settle fails", || {
        logged().contains("forking no more: the 2 children in flight finish first")
    });
    drop(lock);
    let status = run.wait().unwrap();
    assert!(!status.success(), "the error is reported: {}", logged());
    // The two others were not killed: they were answered and recorded.
    let outcomes: Vec<String> = env
        .db()
        .prepare("SELECT outcome FROM attempts ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(outcomes[1..], ["delivered", "delivered"], "{}", logged());
}

// ------------------------------------------------- 13. input edges

#[test]
fn input_edges_are_refused_and_big_input_is_not_read_whole() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    for (args, says) in [
        (
            &["--topic", "t\u{7}", "--account", "a", "--data", "{}"][..],
            "control character",
        ),
        (
            &["--topic", "t", "--account", "a\nb", "--data", "{}"],
            "control character",
        ),
        (
            &["--topic", "t", "--account", "a", "--data", "\"\\ud800\""],
            "payload is not valid JSON",
        ),
    ] {
        let out = env.cronpost(&[&["enqueue"], args].concat());
        assert_eq!(code(&out), 65, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    // A payload far over the limit on stdin is refused without reading it
    // all: the writer finds the pipe closed long before it is done.
    for args in [
        &["enqueue", "--topic", "t", "--account", "a"][..],
        &["enqueue", "--ndjson"],
    ] {
        let mut child = env
            .command(args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let chunk = vec![b'x'; 1 << 20];
        let mut written = 0usize;
        while written < 512 << 20 && stdin.write_all(&chunk).is_ok() {
            written += chunk.len();
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 65, "{args:?}: {}", stderr(&out));
        assert!(written < 64 << 20, "{args:?}: read {written} bytes");
    }
    // Dedup keys are per account.
    for account in ["acme", "globex", "acme"] {
        env.ok(&[
            "enqueue",
            "--topic",
            "t",
            "--account",
            account,
            "--dedup-key",
            "k",
            "--data",
            "{}",
        ]);
    }
    assert_eq!(env.query_i64("SELECT count(*) FROM messages"), 2);
}

// ------------------------------------------------- 14. strict answers

#[test]
fn answers_that_are_not_strict_http_1_are_failures() {
    for answer in [
        "HTTP/1.7 200 OK\r\n\r\n",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let reply = answer.to_string();
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut buf = [0u8; 4096];
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        let env = Env::new(
            "max_messages = 1",
            &endpoint("raw", &format!("http://127.0.0.1:{port}/"), &["t"], ""),
        );
        env.enqueue("t", "a", "{}");
        env.run();
        let (state, error): (String, String) = env
            .db()
            .query_row("SELECT state, last_error FROM deliveries", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(state, "delayed", "{answer:?}: {error}");
        assert!(
            error.contains("not an HTTP/1.x answer") || error.contains("Content-Length"),
            "{answer:?}: {error}"
        );
    }
}

// ------------------------------------------------- 15. config type errors

#[test]
fn a_config_value_of_the_wrong_type_names_its_dotted_key() {
    let rx = Receiver::start();
    let env = Env::new(
        "max_children = \"many\"",
        &endpoint("e", &rx.url("/e"), &["t"], ""),
    );
    let out = env.cronpost(&["check-config"]);
    assert_eq!(code(&out), 78);
    assert!(
        stderr(&out).contains("line 4: run.max_children: invalid type"),
        "{}",
        stderr(&out)
    );
    env.write_config(
        &std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("max_children = \"many\"", "")
            .replace(
                &format!("secret = \"{SECRET}\""),
                &format!("secret = \"{SECRET}\"\nmax_attempts = \"lots\""),
            ),
    );
    let out = env.cronpost(&["check-config"]);
    assert!(
        stderr(&out).contains("endpoints.e.max_attempts"),
        "{}",
        stderr(&out)
    );
    env.write_config(
        &std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("max_attempts = \"lots\"\n", "")
            .replace(&format!("secret = \"{SECRET}\"\n"), ""),
    );
    let out = env.cronpost(&["check-config"]);
    assert!(
        stderr(&out).contains("endpoints.e"),
        "names the endpoint: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("secret"), "{}", stderr(&out));
}
