//! Shared test fixtures: a real HTTP receiver on 127.0.0.1 that records what
//! arrives and answers as scripted, a temporary directory with a config and a
//! database, the real `cronpost` binary, and polling with a deadline.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod postgres;
pub mod systemd;
pub mod tcp;

/// The secret every test endpoint uses.
pub const SECRET: &str = "whsec_dGVzdCBzZWNyZXQ=";

/// What the receiver does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answer with this status.
    Status(u16),
    /// Wait, then answer with this status.
    Delayed(Duration, u16),
    /// Never answer (the request is held until the receiver is dropped).
    Hang,
    /// Answer with this status and a `Retry-After` header.
    RetryAfter(u16, &'static str),
    /// Answer 500 to about this percentage of requests (a fixed pseudo-random
    /// sequence), else 200.
    Flaky(u64),
    /// A rate limit: 200 while fewer than n requests to the path were
    /// answered 200 in the last second (a sliding window), else 429 with
    /// `Retry-After: 1`.
    Limited(u64),
    /// A receiver that slows down under load: answers 200 after 5 ms, plus
    /// 20 ms for each request to the path in the last second beyond n.
    SlowerAbove(u64),
}

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// The status answered (None: no answer).
    pub status: Option<u16>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

#[derive(Default)]
struct Script {
    /// Replies to use first, per path, in order.
    queued: HashMap<String, VecDeque<Reply>>,
    /// The reply once the queue is empty, per path (default 200).
    default: HashMap<String, Reply>,
}

/// A real HTTP server on 127.0.0.1:0, answering on several threads.
pub struct Receiver {
    server: Arc<tiny_http::Server>,
    pub port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Script>>,
    held: Arc<Mutex<Vec<tiny_http::Request>>>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    /// Requests being handled now, and the most seen at once.
    concurrency: Arc<(AtomicUsize, AtomicUsize)>,
}

impl Receiver {
    pub fn start() -> Receiver {
        Receiver::start_on(0)
    }

    /// A receiver on a given port of 127.0.0.1 (0: any free port).
    pub fn start_on(port: u16) -> Receiver {
        let server =
            Arc::new(tiny_http::Server::http(("127.0.0.1", port)).expect("bind 127.0.0.1"));
        let port = server.server_addr().to_ip().unwrap().port();
        let mut receiver = Receiver {
            server,
            port,
            received: Arc::default(),
            script: Arc::default(),
            held: Arc::default(),
            stop: Arc::default(),
            workers: Vec::new(),
            concurrency: Arc::default(),
        };
        for _ in 0..16 {
            let (server, received, script, held, stop, concurrency) = (
                receiver.server.clone(),
                receiver.received.clone(),
                receiver.script.clone(),
                receiver.held.clone(),
                receiver.stop.clone(),
                receiver.concurrency.clone(),
            );
            receiver.workers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(Some(mut request)) = server.recv_timeout(Duration::from_millis(100))
                    else {
                        continue;
                    };
                    let now_handling = concurrency.0.fetch_add(1, Ordering::SeqCst) + 1;
                    concurrency.1.fetch_max(now_handling, Ordering::SeqCst);
                    let mut body = Vec::new();
                    let _ = request.as_reader().read_to_end(&mut body);
                    let path = request.url().to_string();
                    let headers = request
                        .headers()
                        .iter()
                        .map(|h| {
                            (
                                h.field.as_str().as_str().to_ascii_lowercase(),
                                h.value.as_str().to_string(),
                            )
                        })
                        .collect();
                    let index = {
                        let mut received = received.lock().unwrap();
                        received.push(Received {
                            path: path.clone(),
                            headers,
                            body,
                            at: Instant::now(),
                            status: None,
                        });
                        received.len() - 1
                    };
                    let reply = {
                        let mut script = script.lock().unwrap();
                        match script.queued.get_mut(&path).and_then(VecDeque::pop_front) {
                            Some(reply) => reply,
                            None => script
                                .default
                                .get(&path)
                                .copied()
                                .unwrap_or(Reply::Status(200)),
                        }
                    };
                    let since = Instant::now() - Duration::from_secs(1);
                    let recent = |received: &[Received], ok_only: bool| {
                        received
                            .iter()
                            .filter(|r| r.path == path && r.at > since)
                            .filter(|r| !ok_only || r.status == Some(200))
                            .count() as u64
                    };
                    let status = match reply {
                        // Decided and recorded at once: concurrent requests
                        // see each other's answers.
                        Reply::Limited(n) => {
                            let mut received = received.lock().unwrap();
                            let code = if recent(&received, true) >= n {
                                429
                            } else {
                                200
                            };
                            received[index].status = Some(code);
                            Some(code)
                        }
                        Reply::SlowerAbove(n) => {
                            let load = recent(&received.lock().unwrap(), false);
                            std::thread::sleep(Duration::from_millis(
                                5 + 20 * load.saturating_sub(n),
                            ));
                            Some(200)
                        }
                        Reply::Status(code)
                        | Reply::Delayed(_, code)
                        | Reply::RetryAfter(code, _) => Some(code),
                        Reply::Hang => None,
                        Reply::Flaky(percent) => {
                            let roll = (index as u64).wrapping_mul(2_654_435_761) % 100;
                            Some(if roll < percent { 500 } else { 200 })
                        }
                    };
                    received.lock().unwrap()[index].status = status;
                    match reply {
                        Reply::Flaky(_) | Reply::Limited(_) | Reply::SlowerAbove(_) => {
                            let code = status.unwrap();
                            let mut response = tiny_http::Response::empty(code);
                            if code == 429 {
                                response.add_header(
                                    tiny_http::Header::from_bytes("Retry-After", "1").unwrap(),
                                );
                            }
                            let _ = request.respond(response);
                        }
                        Reply::Status(code) => {
                            let _ = request.respond(tiny_http::Response::empty(code));
                        }
                        Reply::Delayed(wait, code) => {
                            std::thread::sleep(wait);
                            let _ = request.respond(tiny_http::Response::empty(code));
                        }
                        Reply::Hang => held.lock().unwrap().push(request),
                        Reply::RetryAfter(code, after) => {
                            let header =
                                tiny_http::Header::from_bytes("Retry-After", after).unwrap();
                            let _ = request
                                .respond(tiny_http::Response::empty(code).with_header(header));
                        }
                    }
                    concurrency.0.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        receiver
    }

    /// The URL of `path` on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Replies for the next requests to `path`, in order.
    pub fn queue(&self, path: &str, replies: &[Reply]) {
        self.script
            .lock()
            .unwrap()
            .queued
            .entry(path.to_string())
            .or_default()
            .extend(replies.iter().copied());
    }

    /// The reply to `path` once its queue is empty.
    pub fn set_default(&self, path: &str, reply: Reply) {
        self.script
            .lock()
            .unwrap()
            .default
            .insert(path.to_string(), reply);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The most requests handled at once so far.
    pub fn max_concurrency(&self) -> usize {
        self.concurrency.1.load(Ordering::SeqCst)
    }

    /// Requests received on `path`.
    pub fn received_on(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Which store a test's queue is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in the test's directory.
    Sqlite,
    /// A fresh database on this test binary's PostgreSQL server, children
    /// connecting through its PgBouncer.
    Postgres,
}

/// `#[test]`s that run `fn NAME(backend: Backend)` once on each backend:
/// `on_sqlite::NAME` and `on_postgres::NAME`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::common::Backend::Sqlite)
                }
            )*
        }
        mod on_postgres {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::common::Backend::Postgres)
                }
            )*
        }
    };
}

/// A temporary directory with a config and a database, and the real binary.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The SQLite file (unused on PostgreSQL).
    pub db: PathBuf,
    /// The PostgreSQL database, when the queue is one.
    pub pg: Option<postgres::Database>,
}

impl Env {
    /// A new environment whose config is `[run]` settings plus `endpoints`
    /// (TOML tables), with the database `q.db` beside it.
    pub fn new(run: &str, endpoints: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cronpost.toml");
        let db = dir.path().join("q.db");
        let env = Env {
            dir,
            config,
            db,
            pg: None,
        };
        env.write_config(&format!(
            "database = \"q.db\"\n\n[run]\n{run}\n\n{endpoints}"
        ));
        env
    }

    /// [`Env::new`] on `backend`.
    pub fn on(backend: Backend, run: &str, endpoints: &str) -> Env {
        match backend {
            Backend::Sqlite => Env::new(run, endpoints),
            Backend::Postgres => Env::on_postgres(run, endpoints, true),
        }
    }

    /// [`Env::new`] on a fresh PostgreSQL database of this test binary's
    /// server, connected directly or through its PgBouncer; the slots in
    /// `slots/` of the directory.
    pub fn on_postgres(run: &str, endpoints: &str, through_bouncer: bool) -> Env {
        let mut env = Env::new(run, endpoints);
        let pg = postgres::database();
        let url = if through_bouncer {
            &pg.bouncer_url
        } else {
            &pg.url
        };
        let text = std::fs::read_to_string(&env.config).unwrap();
        env.write_config(&text.replacen(
            "database = \"q.db\"",
            &format!(
                "database = \"{url}\"\nlisten_database = \"{}\"\nslots_dir = \"slots\"\nhost_name = \"a\"",
                pg.url
            ),
            1,
        ));
        env.pg = Some(pg);
        env
    }

    /// A second config on the same queue, as another host would have: its
    /// own host name and slot directory (and so its own child limit); the
    /// first host is "a".
    pub fn other_host(&self, name: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let path = self.dir.path().join(format!("{name}.toml"));
        let text = text
            .replacen(
                "slots_dir = \"slots\"",
                &format!("slots_dir = \"{name}-slots\""),
                1,
            )
            .replacen("host_name = \"a\"", &format!("host_name = \"{name}\""), 1);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    pub fn write_config(&self, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&self.config, text).unwrap();
        // As an admin would: the config holds endpoint secrets.
        std::fs::set_permissions(&self.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Puts top-level `lines` at the head of the config, before any table.
    pub fn prepend_config(&self, lines: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        self.write_config(&format!("{lines}\n{text}"));
    }

    /// Starts the sqlite3 shell on the database with `sql` (which must end
    /// by printing `marker`), and waits for the marker: the shell then holds
    /// whatever transaction `sql` opened until its stdin is dropped.
    pub fn sqlite3_holding(
        &self,
        sql: &str,
        marker: &str,
    ) -> (std::process::Child, std::process::ChildStdin) {
        use std::io::{BufRead, Write};
        let mut shell = Command::new("sqlite3")
            .arg(&self.db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the sqlite3 shell is installed (.ci/run installs it)");
        let mut stdin = shell.stdin.take().unwrap();
        writeln!(stdin, "{sql}").unwrap();
        stdin.flush().unwrap();
        let mut out = std::io::BufReader::new(shell.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains(marker) {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "sqlite3 ended before printing {marker:?}"
            );
        }
        (shell, stdin)
    }

    /// The binary with this environment's config, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cronpost"));
        cmd.args(args)
            .env("CRONPOST_CONFIG", &self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the binary to completion.
    pub fn cronpost(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs the binary with `input` on stdin.
    pub fn cronpost_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs the binary and asserts it succeeded; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cronpost(args);
        assert!(
            out.status.success(),
            "cronpost {args:?} failed with {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// One dispatcher run, which must succeed.
    pub fn run(&self) -> String {
        self.ok(&["run"])
    }

    /// Enqueues one message with `--data`.
    pub fn enqueue(&self, topic: &str, account: &str, data: &str) {
        self.ok(&[
            "enqueue",
            "--topic",
            topic,
            "--account",
            account,
            "--data",
            data,
        ]);
    }

    /// Enqueues NDJSON, which must succeed.
    pub fn enqueue_ndjson(&self, text: &str) {
        let out = self.cronpost_with_stdin(&["enqueue", "--ndjson"], text.as_bytes());
        assert!(out.status.success(), "{}", stderr(&out));
    }

    /// Enqueues `count` messages of `topic` in one NDJSON batch, each from
    /// its own account (`a0`, `a1`, ...) with the payload `{"n": i}`.
    pub fn enqueue_one_per_account(&self, topic: &str, count: usize) {
        let lines: String = (0..count)
            .map(|i| {
                format!(
                    "{{\"topic\":\"{topic}\",\"account\":\"a{i}\",\"payload\":{{\"n\":{i}}}}}\n"
                )
            })
            .collect();
        self.enqueue_ndjson(&lines);
    }

    /// Starts `runs` concurrent `cronpost run`s, again and again, until
    /// `delivered` deliveries are delivered.
    pub fn run_concurrently_until_delivered(&self, runs: usize, delivered: i64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.count_state("delivered") < delivered {
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {delivered} delivered"
            );
            let children: Vec<std::process::Child> = (0..runs)
                .map(|_| self.command(&["run"]).spawn().unwrap())
                .collect();
            for mut child in children {
                assert!(child.wait().unwrap().success());
            }
        }
    }

    /// A read-only connection to the database, for checking what it holds.
    pub fn db(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_with_flags(
            &self.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn
    }

    /// The first column of the first row of `sql`, on either backend.
    pub fn query_i64(&self, sql: &str) -> i64 {
        match &self.pg {
            Some(pg) => pg.query_i64(sql),
            None => self.db().query_row(sql, [], |r| r.get(0)).unwrap(),
        }
    }

    /// Every row of `sql`, each value as text (NULL as ""), on either
    /// backend.
    pub fn query_rows(&self, sql: &str) -> Vec<Vec<String>> {
        match &self.pg {
            Some(pg) => {
                let out = pg.sql_separated(sql);
                out.lines()
                    .map(|l| l.split('\x1f').map(str::to_string).collect())
                    .collect()
            }
            None => {
                let conn = self.db();
                let mut stmt = conn.prepare(sql).unwrap();
                let columns = stmt.column_count();
                stmt.query_map([], |r| {
                    (0..columns)
                        .map(|i| {
                            Ok(match r.get_ref(i)? {
                                rusqlite::types::ValueRef::Null => String::new(),
                                rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                                rusqlite::types::ValueRef::Real(x) => x.to_string(),
                                rusqlite::types::ValueRef::Text(t) => {
                                    String::from_utf8_lossy(t).into_owned()
                                }
                                rusqlite::types::ValueRef::Blob(b) => format!("{b:?}"),
                            })
                        })
                        .collect()
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
            }
        }
    }

    /// The first row of `sql` (which must have one), values as text.
    pub fn query_row(&self, sql: &str) -> Vec<String> {
        let mut rows = self.query_rows(sql);
        assert!(!rows.is_empty(), "no row from {sql}");
        rows.swap_remove(0)
    }

    /// Count of deliveries in `state`.
    pub fn count_state(&self, state: &str) -> i64 {
        assert!(state.chars().all(|c| c.is_ascii_lowercase()));
        self.query_i64(&format!(
            "SELECT count(*) FROM deliveries WHERE state = '{state}'"
        ))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// An `[endpoints.NAME]` table.
pub fn endpoint(name: &str, url: &str, topics: &[&str], extra: &str) -> String {
    let topics: Vec<String> = topics.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "[endpoints.{name}]\nurl = \"{url}\"\ntopics = [{}]\nsecret = \"{SECRET}\"\n{extra}\n",
        topics.join(", ")
    )
}

/// Polls `cond` until it holds, failing the test after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cronpost run` until `cond` holds, failing after `limit`.
pub fn run_until(env: &Env, limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        env.run();
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} running until: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The processes whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            proc_stat(*pid).and_then(|(_, ppid)| ppid.parse::<u32>().ok()) == Some(parent)
        })
        .collect()
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn exited(pid: i32) -> bool {
    proc_stat(pid).is_none_or(|(state, _)| state == "Z")
}

/// A process's state letter and parent pid, from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(String, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...; comm may hold spaces.
    let mut after = stat[stat.rfind(')')? + 2..].split(' ');
    Some((after.next()?.to_string(), after.next()?.to_string()))
}

/// The SQL statements of the README's "Querying the queue with sqlite3" section.
pub fn readme_queries() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Querying the queue with sqlite3")
        .nth(1)
        .unwrap();
    let section = section.split("\n## ").next().unwrap();
    let mut queries = Vec::new();
    for block in section.split("```sql").skip(1) {
        let sql = block.split("```").next().unwrap();
        let mut current = String::new();
        for line in sql.lines().filter(|l| !l.trim_start().starts_with("--")) {
            current += line;
            current += "\n";
            if line.trim_end().ends_with(';') {
                queries.push(std::mem::take(&mut current));
            }
        }
    }
    queries
}
