//! The command line: publishing, bad input, config errors, stats, and the
//! schema as a producer using plain SQL (through the real `sqlite3` shell) sees it.

mod common;

use std::process::Command;

use common::*;

fn code(out: &std::process::Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn messages(env: &Env) -> i64 {
    if !env.db.exists() {
        return 0;
    }
    env.query_i64("SELECT count(*) FROM messages")
}

fn env_with_topics(rx: &Receiver) -> Env {
    Env::new(
        "",
        &(endpoint("crm", &rx.url("/crm"), &["customer.updated"], "")
            + &endpoint(
                "billing",
                &rx.url("/billing"),
                &["invoice.paid", "customer.updated"],
                "",
            )),
    )
}

#[test]
fn a_message_inserted_with_plain_sql_through_the_sqlite3_shell_is_delivered() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    env.ok(&["migrate"]);
    let out = Command::new("sqlite3")
        .arg(&env.db)
        .arg(r#"INSERT INTO messages (topic, account, payload) VALUES ('invoice.paid', 'acme', '{"invoice": 7}');"#)
        .output()
        .expect("the sqlite3 shell is installed (.ci/run installs it)");
    assert!(out.status.success(), "{}", stderr(&out));
    // The shell rejects a payload that is not JSON: nothing is written.
    let out = Command::new("sqlite3")
        .arg(&env.db)
        .arg("INSERT INTO messages (topic, account, payload) VALUES ('invoice.paid', 'acme', '{oops');")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("CHECK constraint failed"),
        "{}",
        stderr(&out)
    );

    env.run();

    let got = rx.received_on("/billing");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, br#"{"invoice": 7}"#);
    assert!(got[0].header("webhook-id").starts_with("msg_"));
    assert_eq!(env.count_state("delivered"), 1);
    let created_at = env.query_i64("SELECT created_at FROM messages");
    let now_ms = cronpost::store::now_ms();
    assert!(
        (now_ms - 60_000..=now_ms).contains(&created_at),
        "default created_at is now in ms: {created_at}"
    );
}

#[test]
fn enqueue_options_are_stored_and_dedup_keys_skip_repeats() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    let args = [
        "enqueue",
        "--topic",
        "invoice.paid",
        "--account",
        "acme",
        "--priority",
        "-5",
        "--delay",
        "1h",
        "--dedup-key",
        "inv-1",
        "--data",
        "[1,2]",
    ];
    assert!(env.ok(&args).contains("enqueued 1 message"));
    assert!(env.ok(&args).contains("1 skipped"));
    let (priority, delay, key): (i64, i64, String) = env
        .db()
        .query_row(
            "SELECT priority, available_at - created_at, dedup_key FROM messages",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((priority, delay, key.as_str()), (-5, 3_600_000, "inv-1"));

    // A delayed message waits in the delayed queue with its reason.
    env.run();
    assert_eq!(env.count_state("delayed"), 1);
    assert_eq!(
        env.query_i64("SELECT count(*) FROM deliveries WHERE reason = 'scheduled'"),
        1
    );
    assert!(rx.received().is_empty());
}

#[test]
fn a_payload_from_stdin_is_accepted_without_the_trailing_newline() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    let out = env.cronpost_with_stdin(
        &["enqueue", "--topic", "invoice.paid", "--account", "a"],
        b"{\"x\":1}\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    env.run();
    assert_eq!(rx.received_on("/billing")[0].body, b"{\"x\":1}");
}

#[test]
fn bad_messages_exit_65_with_a_clear_message_and_write_nothing() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--topic",
                "invoice.paid",
                "--account",
                "a",
                "--data",
                "{not json",
            ],
            "payload is not valid JSON",
        ),
        (
            &[
                "--topic",
                "nobody.listens",
                "--account",
                "a",
                "--data",
                "{}",
            ],
            "unknown topic \"nobody.listens\"",
        ),
        (
            &["--topic", "invoice.paid", "--account", "", "--data", "{}"],
            "account must not be empty",
        ),
        (
            &[
                "--topic",
                "invoice.paid",
                "--account",
                "a",
                "--priority",
                "99999",
                "--data",
                "{}",
            ],
            "priority 99999",
        ),
        (
            &[
                "--topic",
                "invoice.paid",
                "--account",
                "a",
                "--delay",
                "soon",
                "--data",
                "{}",
            ],
            "delay \"soon\"",
        ),
    ];
    for (args, expected) in cases {
        let out = env.cronpost(&[&["enqueue"], *args].concat());
        assert_eq!(code(&out), 65, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(
            stderr(&out).lines().count(),
            1,
            "one line: {}",
            stderr(&out)
        );
    }
    let out = env.cronpost_with_stdin(
        &["enqueue", "--topic", "invoice.paid", "--account", "a"],
        b"\xff\xfe",
    );
    assert_eq!(code(&out), 65);
    assert!(stderr(&out).contains("not UTF-8"), "{}", stderr(&out));
    assert_eq!(messages(&env), 0);
}

#[test]
fn ndjson_is_all_or_nothing_and_names_the_bad_line() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    let good = "{\"topic\":\"invoice.paid\",\"account\":\"a\",\"payload\":{\"n\":1}}\n\n\
                {\"topic\":\"customer.updated\",\"account\":\"b\",\"payload\":[1],\"priority\":3,\"delay\":\"1s\",\"dedup_key\":\"k\"}\n";
    let out = env.cronpost_with_stdin(&["enqueue", "--ndjson"], good.as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("enqueued 2 messages"));

    let bad_lines = [
        (
            "{\"topic\":\"invoice.paid\",\"account\":\"a\"}",
            "missing field `payload`",
        ),
        (
            "{\"topic\":\"nope\",\"account\":\"a\",\"payload\":1}",
            "unknown topic",
        ),
        (
            "{\"topic\":\"invoice.paid\",\"account\":\"a\",\"payload\":1,\"colour\":1}",
            "unknown field `colour`",
        ),
        ("not json", "expected"),
    ];
    for (bad, expected) in bad_lines {
        let input = format!("{good}{bad}\n{good}");
        let out = env.cronpost_with_stdin(&["enqueue", "--ndjson"], input.as_bytes());
        assert_eq!(code(&out), 65, "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("line 4:"), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{bad}: {}", stderr(&out));
    }
    assert_eq!(messages(&env), 2, "no bad batch wrote anything");
}

#[test]
fn bad_configs_exit_78_naming_the_key_and_line() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    let good = std::fs::read_to_string(&env.config).unwrap();
    let cases = [
        (
            good.replace(
                "[run]\n",
                "[run]\nlease_timeout = \"5s\"\nchild_deadline = \"10s\"\n",
            ),
            "line 4: run.lease_timeout (5s) must be longer than run.child_deadline (10s) plus busy_timeout (5s)",
        ),
        (
            good.replace("[run]\n", "[run]\nmax_childs = 3\n"),
            "unknown field `max_childs`",
        ),
        (
            good.replace(&rx.url("/crm"), "not a url"),
            "endpoints.crm.url",
        ),
        (
            good.replace("[run]\n", "[run]\nmax_children = 0\n"),
            "run.max_children = 0",
        ),
        (
            good.replace("[run]\n", "[run]\nmax_runtime = \"forever\"\n"),
            "run.max_runtime",
        ),
        ("database = \"q.db\"\n".to_string(), "at least one endpoint"),
    ];
    for (text, expected) in cases {
        env.write_config(&text);
        for command in ["check-config", "run", "enqueue"] {
            let out = env.cronpost(
                &[command, "--topic", "t", "--account", "a", "--data", "{}"]
                    [..if command == "enqueue" { 7 } else { 1 }],
            );
            assert_eq!(
                code(&out),
                78,
                "{command} with {expected}: {}",
                stderr(&out)
            );
            assert!(
                stderr(&out).contains(expected),
                "{command}: {}",
                stderr(&out)
            );
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_cronpost"))
        .args(["check-config", "--config"])
        .arg(env.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(code(&out), 78);
    assert!(stderr(&out).contains("missing.toml"), "{}", stderr(&out));
    assert_eq!(messages(&env), 0);

    env.write_config(&good);
    assert!(env.ok(&["check-config"]).contains("is valid"));
}

#[test]
fn usage_errors_exit_64() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    for args in [
        &["enqueue", "--topic", "t"][..],
        &["frobnicate"],
        &["enqueue", "--ndjson", "--topic", "t"],
    ] {
        let out = env.cronpost(args);
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn stats_counts_states_per_endpoint_in_tables_and_json() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    rx.set_default("/crm", Reply::Status(410));
    env.enqueue("customer.updated", "acme", "{}");
    env.enqueue("invoice.paid", "acme", "{}");
    env.run();

    let json: serde_json::Value = serde_json::from_str(&env.ok(&["stats", "--json"])).unwrap();
    let endpoints = json["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2);
    assert_eq!(endpoints[0]["endpoint"], "billing");
    assert_eq!(endpoints[0]["delivered"], 2);
    assert_eq!(endpoints[1]["endpoint"], "crm");
    assert_eq!(endpoints[1]["dead"], 1);
    assert_eq!(json["last_run"]["forked"], 3);
    assert_eq!(json["last_run_attempts"]["delivered"], 2);
    assert_eq!(json["last_run_attempts"]["dead"], 1);
    assert!(json["oldest_ready_age_seconds"].is_null());

    let table = env.ok(&["stats"]);
    assert!(
        table.lines().next().unwrap().contains("delivered"),
        "{table}"
    );
    assert!(
        table.contains("attempts in last run: dead 1, delivered 2"),
        "{table}"
    );
    assert!(
        !table.contains("whsec_") && !table.contains("dGVzdCBzZWNyZXQ"),
        "no secrets"
    );
}

#[test]
fn migrate_records_the_schema_version_in_the_file_and_is_idempotent() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    let latest = cronpost::store::SqliteStore::latest_schema_version();
    assert!(latest >= 2);
    let version = format!("schema version {latest}");
    assert!(env.ok(&["migrate"]).contains(&version));
    assert!(env.ok(&["migrate"]).contains(&version));
    assert_eq!(env.query_i64("PRAGMA user_version"), latest);
    let journal: String = env
        .db()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
}

#[test]
fn the_demo_delivers_its_messages() {
    let out = Command::new(env!("CARGO_BIN_EXE_cronpost"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    assert_eq!(stdout.matches("signature=valid").count(), 5, "{stdout}");
}

// ------------------------------------------------- the first hour

/// The fenced block of `lang` that follows `heading` in the README.
fn readme_block(heading: &str, lang: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split(heading).nth(1).expect("the section exists");
    let fence = format!("```{lang}\n");
    let block = section.split(&fence).nth(1).expect("the block exists");
    block.split("\n```").next().unwrap().to_string()
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// PATH with the binary under test first.
fn path_with_cronpost() -> String {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_cronpost"))
        .parent()
        .unwrap()
        .to_owned();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn the_readme_quick_start_works_as_written_from_an_empty_directory() {
    let script = readme_block("## Quick start from scratch", "sh");
    let port = free_port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .args(["-e", "-c", &script.replace("8080", &port)])
        .current_dir(dir.path())
        .env("PATH", path_with_cronpost())
        .env_remove("CRONPOST_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    for expected in [
        "is valid",
        "enqueued 1 message: id 1 (uid msg_",
        "signature=valid status=200",
        "message 1 (msg_",
        "found by its message id",
        "delivery d1 to hooks: delivered",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn the_readme_python_receiver_verifies_real_deliveries() {
    let verify = readme_block("## Receiving webhooks", "python");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = format!(
        r#"{verify}
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers['content-length']))
        headers = {{k.lower(): v for k, v in self.headers.items()}}
        print('VALID' if verify(sys.argv[1], headers, body) else 'INVALID', flush=True)
        self.send_response(204)
        self.end_headers()
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(('127.0.0.1', {port}), H)
print('ready', flush=True)
s.handle_request()
"#
    );
    std::fs::write(dir.path().join("receiver.py"), server).unwrap();
    let env = Env::new(
        "",
        &endpoint("py", &format!("http://127.0.0.1:{port}/in"), &["t"], "").replace(
            &format!("secret = \"{SECRET}\""),
            "secret = [\"whsec_bmV3IHNlY3JldA\", \"old\"]",
        ),
    );
    for secret in ["whsec_bmV3IHNlY3JldA", "old"] {
        let mut python = Command::new("python3")
            .arg(dir.path().join("receiver.py"))
            .arg(secret)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(python.stdout.take().unwrap()));
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        env.enqueue("t", "a", r#"{"n":"é"}"#);
        env.run();
        assert_eq!(lines.next().unwrap().unwrap(), "VALID", "secret {secret}");
        let _ = python.kill();
        let _ = python.wait();
    }
}

#[test]
fn commands_print_ids_and_json_and_refuse_what_they_do_not_take() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    let json: serde_json::Value = serde_json::from_str(&env.ok(&[
        "enqueue",
        "--topic",
        "customer.updated",
        "--account",
        "a",
        "--data",
        "{}",
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["inserted"], 1);
    assert_eq!(json["messages"][0]["id"], 1);
    assert!(
        json["messages"][0]["uid"]
            .as_str()
            .unwrap()
            .starts_with("msg_")
    );
    let run: serde_json::Value = serde_json::from_str(&env.ok(&["run", "--json"])).unwrap();
    assert_eq!(
        (run["forked"].clone(), run["delivered"].clone()),
        (2.into(), 2.into())
    );
    // A run that forks children that find nothing says so.
    assert!(run["found_nothing"].is_number());

    for (args, says) in [
        (
            &["receive", "--config", "x.toml"][..],
            "unexpected argument '--config'",
        ),
        (
            &["demo", "--config", "x.toml"],
            "unexpected argument '--config'",
        ),
        (
            &["purge", "--older-than", "7"],
            "7 needs a unit, like 7d or 7h",
        ),
        (&["purge", "--older-than", "7d", "--dry-run"], "--orphaned"),
        (&["show", "a b"], "is not a message id"),
        (&["requeue", "x17"], "is not a delivery id"),
    ] {
        let out = env.cronpost(args);
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    // Usage shows --config as the option it is.
    let help = env.ok(&["run", "--help"]);
    assert!(help.contains("Usage: cronpost run [OPTIONS]"), "{help}");
    assert!(help.contains("--config <PATH>"), "{help}");
    let help = env.ok(&["requeue", "--help"]);
    assert!(help.contains("[possible values: dead, delayed]"), "{help}");
    // Plurals.
    assert!(
        env.ok(&["requeue", "--dry-run"])
            .contains("would requeue 0 deliveries")
    );
}

#[test]
fn check_config_catches_what_a_run_would_trip_on_naming_each_key() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    let good = std::fs::read_to_string(&env.config).unwrap();
    let out = env.cronpost(&["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(fire_and_forget)"), "{text}");
    assert!(
        text.contains("warning: schedule is not set: `cronpost daemon` needs it"),
        "{text}"
    );
    for (config, key) in [
        (
            good.replace("database = \"q.db\"", "database = \"nowhere/q.db\""),
            "database = ",
        ),
        (
            format!("metrics_file = \"gone/m.prom\"\n{good}"),
            "metrics_file = ",
        ),
    ] {
        env.write_config(&config);
        for command in ["check-config", "run"] {
            let out = env.cronpost(&[command]);
            assert_eq!(code(&out), 73, "{command} {key}: {}", stderr(&out));
            assert!(stderr(&out).contains(key), "{command}: {}", stderr(&out));
            assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
        }
    }
    env.write_config(&good);
    let out = env.cronpost(&["daemon"]);
    assert_eq!(code(&out), 78, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("schedule is required"),
        "{}",
        stderr(&out)
    );
    // The printed defaults are a config that loads.
    let defaults = env.ok(&["check-config", "--print-defaults"]);
    env.write_config(&defaults.replace("/var/lib/cronpost/cronpost.db", "q.db"));
    assert!(env.ok(&["check-config"]).contains("is valid"));
}

#[test]
fn small_things_of_the_first_hour() {
    let rx = Receiver::start();
    let env = env_with_topics(&rx);
    // One line number, and the column.
    let out = env.cronpost_with_stdin(
        &["enqueue", "--ndjson"],
        b"{\"topic\":\"invoice.paid\",\"account\":\"a\",\"payload\":{}}\n{\"topic\":\"invoice.paid\",\"account\":\"a\"}\n",
    );
    assert_eq!(code(&out), 65);
    assert!(
        stderr(&out).contains("line 2: column 38: missing field `payload`"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("at line 1"), "{}", stderr(&out));
    // A cron error in one line.
    let good = std::fs::read_to_string(&env.config).unwrap();
    env.write_config(&format!("schedule = \"*/5 * * * *\"\n{good}"));
    let out = env.cronpost(&["check-config"]);
    assert_eq!(code(&out), 78);
    assert_eq!(
        stderr(&out).trim_end().lines().count(),
        1,
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("6 or 7 fields"), "{}", stderr(&out));
    env.write_config(&good);
    // A plain-SQL message for a topic nobody subscribes to: marked once,
    // warned about once, shown by stats.
    env.ok(&["migrate"]);
    rusqlite::Connection::open(&env.db)
        .unwrap()
        .execute(
            "INSERT INTO messages (topic, account, payload) VALUES ('nobody.listens', 'a', '{}')",
            [],
        )
        .unwrap();
    let first = env.cronpost(&["run"]);
    assert!(
        stderr(&first).contains("marked unroutable"),
        "{}",
        stderr(&first)
    );
    let second = env.cronpost(&["run"]);
    assert!(
        !stderr(&second).contains("unroutable"),
        "{}",
        stderr(&second)
    );
    assert!(
        !stderr(&second).contains("run "),
        "an idle run is quiet: {}",
        stderr(&second)
    );
    let stats = env.ok(&["stats"]);
    assert!(stats.contains("unroutable messages: 1"), "{stats}");
    let show = env.ok(&["show", "1"]);
    assert!(
        show.contains("unroutable: no endpoint subscribes to topic \"nobody.listens\""),
        "{show}"
    );
    // The demo's own config is private: no warning about it.
    let out = Command::new(env!("CARGO_BIN_EXE_cronpost"))
        .arg("demo")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!stderr(&out).contains("world-readable"), "{}", stderr(&out));
}
