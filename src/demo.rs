//! `cronpost demo`: the whole product in one command. In a fresh temporary
//! directory it starts `cronpost receive`, writes a config with two endpoints
//! (fan-out on one topic), enqueues a few messages, runs the dispatcher as its
//! own process and prints what arrived.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::config::Config;
use crate::enqueue::Draft;
use crate::error::{Error, ExitCode, Result};
use crate::store::now_ms;

/// Runs the demo.
pub fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("cronpost-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode("cronpost demo secret")
    );

    let mut receiver = Command::new(&exe)
        .args(["receive", "--port", "0"])
        .env("CRONPOST_RECEIVE_SECRET", &secret)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("cannot start the receiver", e))?;
    let lines = receiver_lines(&mut receiver);
    let result = demo_with_receiver(&exe, &dir, &secret, &lines);
    let _ = receiver.kill();
    let _ = receiver.wait();
    result?;
    println!(
        "\nThe demo's files are in {}; look around with:",
        dir.display()
    );
    println!(
        "  cronpost --config {} stats",
        dir.join("cronpost.toml").display()
    );
    println!(
        "  sqlite3 {} 'SELECT * FROM attempts'",
        dir.join("demo.db").display()
    );
    Ok(())
}

/// Writes the demo's config 0600: it holds the endpoints' secret.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|e| Error::io(path.display(), e))
}

/// Lines the receiver prints, read on a thread so we can wait with a deadline.
fn receiver_lines(receiver: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = receiver.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn demo_with_receiver(
    exe: &Path,
    dir: &Path,
    secret: &str,
    lines: &mpsc::Receiver<String>,
) -> Result<()> {
    let timeout = Duration::from_secs(10);
    let first = lines
        .recv_timeout(timeout)
        .map_err(|_| Error::new(ExitCode::Unavailable, "the receiver did not start"))?;
    let url = first
        .strip_prefix("listening on ")
        .ok_or_else(|| Error::software(format!("unexpected receiver output: {first}")))?;
    println!("receiver listening on {url}");

    let config_path = dir.join("cronpost.toml");
    let config_text = format!(
        r#"# cronpost demo config
database = "demo.db"

[run]
max_children = 4

[endpoints.crm]
url = "{url}/crm"
topics = ["customer.updated", "invoice.paid"]
secret = "{secret}"

[endpoints.billing]
url = "{url}/billing"
topics = ["invoice.paid"]
secret = "{secret}"
"#
    );
    write_private(&config_path, &config_text)?;
    let config = Config::load(&config_path)?;

    let drafts = [
        (
            "customer.updated",
            "acme",
            r#"{"customer":42,"name":"Ada"}"#,
            0,
        ),
        (
            "invoice.paid",
            "acme",
            r#"{"invoice":"INV-1","amount":1200}"#,
            0,
        ),
        (
            "invoice.paid",
            "globex",
            r#"{"invoice":"INV-2","amount":99}"#,
            5,
        ),
    ];
    let now = now_ms();
    let messages = drafts
        .iter()
        .map(|(topic, account, payload, priority)| {
            Draft {
                topic: topic.to_string(),
                account: account.to_string(),
                payload: payload.to_string(),
                priority: *priority,
                ..Draft::default()
            }
            .validate(&config, now)
        })
        .collect::<Result<Vec<_>>>()?;
    crate::store::open(&config)?.messages_insert(&messages)?;
    println!(
        "enqueued 3 messages: customer.updated -> crm; invoice.paid -> crm and billing (fan-out)\n"
    );

    let status = Command::new(exe)
        .args(["run", "--config"])
        .arg(&config_path)
        .status()
        .map_err(|e| Error::io("cannot start `cronpost run`", e))?;
    if !status.success() {
        return Err(Error::software(format!("`cronpost run` failed: {status}")));
    }

    let expected = 5;
    let deadline = Instant::now() + timeout;
    println!("\nwhat the receiver got:");
    for _ in 0..expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .map_err(|_| Error::software("not every delivery reached the receiver in time"))?;
        println!("  {line}");
    }
    println!();
    let status = Command::new(exe)
        .args(["stats", "--config"])
        .arg(&config_path)
        .status()
        .map_err(|e| Error::io("cannot start `cronpost stats`", e))?;
    if !status.success() {
        return Err(Error::software("`cronpost stats` failed"));
    }
    Ok(())
}
