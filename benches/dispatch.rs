//! cronpost's benchmark: builds queues with the library, drains them with the
//! real `cronpost` binary against a fast receiver on 127.0.0.1, and prints
//! one markdown table. Run with `bench/run.sh` (or `bench/run.sh --quick`).
//!
//! The same executable plays three roles, so that nothing forks from a
//! process with threads: the orchestrator (no arguments but flags), the
//! receiver (`receive`), and the per-step child harness (`steps`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "dispatch/adaptive.rs"]
mod adaptive;
#[path = "dispatch/postgres.rs"]
mod postgres;
#[path = "../tests/common/postgres.rs"]
mod postgres_server;
#[path = "../tests/common/tcp.rs"]
mod tcp;

use cronpost::config::Config;
use cronpost::store::{self, NewMessage, Store};

const BIN: &str = env!("CARGO_BIN_EXE_cronpost");
const ACCOUNTS: usize = 50;
const PAYLOAD_BYTES: usize = 512;
const SECRET: &str = "whsec_YmVuY2htYXJrLXNlY3JldA==";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("receive") => receive(args.get(1).map_or(4, |t| t.parse().unwrap())),
        Some("stamp-receive") => stamp_receive(),
        Some("limited-receive") => adaptive::limited_receive(&args[1..]),
        Some("steps") => steps(Path::new(&args[1]), args[2].parse().unwrap()),
        Some("fork-post") => fork_post(
            Path::new(&args[1]),
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
        ),
        _ => orchestrate(&args),
    }
}

// ---------------------------------------------------------------- receiver

/// The fast receiver: `threads` threads blocking in accept(2) on one socket,
/// each serving a connection to its end. It reads each request whole,
/// answers 200 with an empty body and, when the client asked for
/// `connection: close`, closes first, so TIME_WAIT stays on this side.
/// Prints its URL, then one count per line whenever stdin gets a line.
fn receive(threads: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let count = Arc::new(AtomicU64::new(0));
    for _ in 0..threads {
        let listener = listener.try_clone().expect("clone listener");
        let count = count.clone();
        std::thread::spawn(move || {
            loop {
                if let Ok((stream, _)) = listener.accept() {
                    serve_connection(stream, &mut |_| {
                        count.fetch_add(1, Ordering::Relaxed);
                    });
                }
            }
        });
    }
    println!("http://{}", listener.local_addr().unwrap());
    for _ in std::io::stdin().lock().lines() {
        println!("{}", count.load(Ordering::Relaxed));
    }
}

/// Serves the requests of one connection, calling `arrived` with each
/// request's head (lowercased) once the whole request is in; answers 200.
fn serve_connection(stream: TcpStream, arrived: &mut dyn FnMut(&str)) {
    serve_connection_answering(stream, &mut |head| {
        arrived(head);
        200
    });
}

/// [`serve_connection`], answering each request with the status `answer`
/// gives it (429 with `Retry-After: 1`).
fn serve_connection_answering(mut stream: TcpStream, answer: &mut dyn FnMut(&str) -> u16) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = vec![0u8; 8192];
    let mut filled = 0;
    loop {
        let head_end = loop {
            if let Some(p) = find(&buf[..filled], b"\r\n\r\n") {
                break p + 4;
            }
            if filled == buf.len() {
                return;
            }
            match stream.read(&mut buf[filled..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let length: usize = header("content-length:").map_or(0, |v| v.parse().unwrap_or(0));
        let close = header("connection:").is_some_and(|v| v == "close");
        let end = head_end + length;
        if buf.len() < end {
            buf.resize(end, 0);
        }
        while filled < end {
            match stream.read(&mut buf[filled..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        }
        let status = match answer(&head) {
            429 => "429 Too Many Requests\r\nretry-after: 1",
            _ => "200 OK",
        };
        let connection = if close { "connection: close\r\n" } else { "" };
        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n{connection}\r\n");
        if stream.write_all(answer.as_bytes()).is_err() || close {
            return;
        }
        buf.copy_within(end..filled, 0);
        filled -= end;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A receiver process.
struct Receiver {
    process: Child,
    url: String,
    lines: BufReader<std::process::ChildStdout>,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::start_role(&["receive".to_string()])
    }

    /// A receiver role of this executable (`args`: the role and its
    /// arguments), which prints its URL first, then a line whenever stdin
    /// gets one.
    fn start_role(args: &[String]) -> Receiver {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the receiver");
        let mut lines = BufReader::new(process.stdout.take().unwrap());
        let mut url = String::new();
        lines.read_line(&mut url).unwrap();
        Receiver {
            process,
            url: url.trim().to_string(),
            lines,
        }
    }

    /// The line it prints when asked.
    fn ask(&mut self) -> String {
        writeln!(self.process.stdin.as_mut().unwrap()).unwrap();
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        line
    }

    fn count(&mut self) -> u64 {
        self.ask().trim().parse().unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The stamping receiver, for latency: answers as `receive` does and
/// prints `<webhook-id> <arrival, µs since the epoch>` per request.
fn stamp_receive() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("http://{}", listener.local_addr().unwrap());
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let listener = listener.try_clone().expect("clone listener");
            let out = out.clone();
            std::thread::spawn(move || {
                while let Ok((stream, _)) = listener.accept() {
                    serve_connection(stream, &mut |head| {
                        let at = epoch_us();
                        let id = head
                            .lines()
                            .find_map(|l| l.strip_prefix("webhook-id:"))
                            .unwrap_or("")
                            .trim()
                            .to_string();
                        let mut out = out.lock().unwrap();
                        let _ = writeln!(out, "{id} {at}");
                        let _ = out.flush();
                    });
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A stamping receiver process, its arrivals collected by a thread (the
/// orchestrating process forks nothing itself: it spawns).
struct StampReceiver {
    process: Child,
    url: String,
    arrivals: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

impl StampReceiver {
    fn start() -> StampReceiver {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .arg("stamp-receive")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the stamping receiver");
        let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
        let url = lines.next().unwrap().unwrap();
        let arrivals = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let into = arrivals.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some((id, at)) = line.split_once(' ') {
                    into.lock()
                        .unwrap()
                        .insert(id.to_string(), at.parse().unwrap());
                }
            }
        });
        StampReceiver {
            process,
            url,
            arrivals,
        }
    }

    fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    /// When `id` arrived, waiting for it up to 10 s.
    fn arrival(&self, id: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(&at) = self.arrivals.lock().unwrap().get(id) {
                return at;
            }
            assert!(Instant::now() < deadline, "{id} never arrived");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for StampReceiver {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

// ---------------------------------------------------------------- steps

/// The names of the intervals `steps` reports, in order.
const STEP_NAMES: [&str; 9] = [
    "fork",
    "open DB",
    "lease",
    "build request",
    "connect",
    "POST",
    "record",
    "exit",
    "total",
];

/// Forks `n` children one after another, each running the real child code
/// (`child::main_traced`), and prints the median of each step in
/// microseconds, tab-separated in `STEP_NAMES` order. The marks go through
/// a shared anonymous mapping; `fork` runs from before fork(2) in the parent
/// to the child's first instruction, `exit` from the child's last mark to
/// waitpid(2) returning in the parent.
fn steps(config: &Path, n: usize) {
    use cronpost::child::{self, ChildContext};
    use cronpost::steps::Step;
    use cronpost::store::Queue;
    let config = Config::load(config).unwrap();
    // As the dispatcher does: open the database before forking (so SQLite
    // is initialised in the parent), close it, start the keeper, warm up.
    drop(store::open(&config).unwrap());
    let _keeper = cronpost::keeper::Keeper::start(&config);
    cronpost::delivery::warm_up(false);
    let base = Instant::now();
    // SAFETY: a fresh anonymous shared mapping of 8 u64s, never unmapped.
    let marks = unsafe {
        let p = nix::libc::mmap(
            std::ptr::null_mut(),
            4096,
            nix::libc::PROT_READ | nix::libc::PROT_WRITE,
            nix::libc::MAP_SHARED | nix::libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, nix::libc::MAP_FAILED);
        std::slice::from_raw_parts_mut(p as *mut AtomicU64, 8)
    };
    let at = |marks: &[AtomicU64], i: usize| marks[i].load(Ordering::SeqCst) as f64 / 1000.0;
    let mut intervals: Vec<Vec<f64>> = vec![Vec::new(); STEP_NAMES.len()];
    for i in 0..n {
        for m in marks.iter() {
            m.store(0, Ordering::SeqCst);
        }
        let forked = base.elapsed().as_nanos() as u64;
        // SAFETY: this process has one thread; the child runs the child's
        // code and _exits, as the dispatcher's children do.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                marks[0].store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
                let ctx = ChildContext {
                    owner: format!("steps.{i}"),
                    run_id: 0,
                    prefer: Queue::Ready,
                    boot_id: cronpost::clock::boot_id(),
                    deadline: Instant::now() + config.run.child_deadline,
                };
                let code = child::main_traced(&config, &ctx, &mut |step| {
                    let slot = match step {
                        Step::Opened => 1,
                        Step::Leased => 2,
                        Step::Prepared => 3,
                        Step::Connected => 4,
                        Step::Answered => 5,
                        Step::Recorded => 6,
                    };
                    marks[slot].store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
                });
                unsafe { nix::libc::_exit(code as i32) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                let reaped = base.elapsed().as_nanos() as f64 / 1000.0;
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
                let forked = forked as f64 / 1000.0;
                let mut points = vec![forked];
                points.extend((0..7).map(|k| at(marks, k)));
                points.push(reaped);
                for k in 0..8 {
                    intervals[k].push(points[k + 1] - points[k]);
                }
                intervals[8].push(reaped - forked);
            }
        }
    }
    let medians: Vec<String> = intervals
        .into_iter()
        .map(|xs| format!("{:.0}", median(xs)))
        .collect();
    println!("{}", medians.join("\t"));
}

/// The fork tax without SQLite: forks `n` children, at most `children` at a
/// time, each POSTing one fixed 512-byte message with a one-shot client
/// and exiting; prints deliveries per second. A lower bound on the cost of
/// any fork-per-delivery design on this machine.
fn fork_post(config: &Path, n: usize, children: usize) {
    use nix::sys::wait::{WaitStatus, wait};
    let config = Config::load(config).unwrap();
    let endpoint = &config.endpoints[0];
    let lease = store::Lease {
        delivery_id: 1,
        attempt_id: 1,
        attempt: 1,
        owner: "fork-post".into(),
        endpoint: endpoint.name.clone(),
        message_uid: "msg_0123456789abcdef01234567".into(),
        topic: "t".into(),
        account: "a1".into(),
        payload: payload(1),
        ordering_key: None,
    };
    cronpost::delivery::warm_up(false);
    let started = Instant::now();
    let (mut forked, mut alive) = (0, 0);
    while forked < n || alive > 0 {
        if forked < n && alive < children {
            // SAFETY: one thread; the child posts and _exits.
            match unsafe { nix::unistd::fork() }.unwrap() {
                nix::unistd::ForkResult::Child => {
                    let mut client = cronpost::delivery::Client::one_shot();
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let result =
                        client.post(endpoint, &lease, 1_700_000_000, deadline, &mut |_| {});
                    let ok = matches!(
                        result,
                        cronpost::delivery::PostResult::Answered { status: 200, .. }
                    );
                    unsafe { nix::libc::_exit(if ok { 0 } else { 1 }) }
                }
                nix::unistd::ForkResult::Parent { .. } => {
                    forked += 1;
                    alive += 1;
                }
            }
        } else {
            let status = wait().unwrap();
            assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
            alive -= 1;
        }
    }
    println!("{:.0}", n as f64 / started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------- queues

/// A scratch directory with a config and a database built by the library.
struct Bench {
    dir: tempfile::TempDir,
    url: String,
}

impl Bench {
    fn new(url: &str) -> Bench {
        Bench {
            dir: tempfile::tempdir().unwrap(),
            url: url.to_string(),
        }
    }

    /// Writes `NAME.toml` for `db` with `children` children and
    /// `endpoints` endpoints on topic t; returns its path.
    fn config(&self, name: &str, db: &str, children: usize, endpoints: usize) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        let mut text = format!(
            "database = \"{db}\"\n[run]\nmax_children = {children}\nmax_messages = 10000000\nmax_runtime = \"1h\"\n"
        );
        for e in 0..endpoints {
            text.push_str(&format!(
                "[endpoints.e{e}]\nurl = \"{}/hook\"\ntopics = [\"t\"]\nsecret = \"{SECRET}\"\n",
                self.url
            ));
        }
        std::fs::write(&path, text).unwrap();
        // Secrets inside: cronpost warns about a world-readable config.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        path
    }

    fn load(&self, config: &Path) -> Config {
        Config::load(config).unwrap()
    }

    /// A database `name.db` with `n` ready deliveries, built once and copied.
    fn ready_db(&self, name: &str, n: usize) -> PathBuf {
        let db = self.dir.path().join(format!("{name}.db"));
        if !db.exists() {
            let config = self.load(&self.config(name, &format!("{name}.db"), 1, 1));
            let mut store = store::open(&config).unwrap();
            insert_messages(store.as_mut(), n);
            store
                .subscriptions_replace(&cronpost::routing::subscriptions(&config))
                .unwrap();
            cronpost::routing::route_all(store.as_mut(), store::now_ms(), &mut || {}).unwrap();
        }
        db
    }

    /// Removes `name.db` and its -wal and -shm files.
    fn remove_db(&self, name: &str) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(self.dir.path().join(format!("{name}.db{suffix}")));
        }
    }

    /// A fresh copy of `name.db` as `copy.db`; returns its config for
    /// `children` children.
    fn copy_of(&self, name: &str, n: usize, children: usize) -> PathBuf {
        let template = self.ready_db(name, n);
        self.remove_db("copy");
        std::fs::copy(template, self.dir.path().join("copy.db")).unwrap();
        self.config("copy", "copy.db", children, 1)
    }
}

/// A 512-byte JSON payload.
fn payload(i: usize) -> String {
    let head = format!("{{\"n\":{i},\"pad\":\"");
    format!("{head}{}\"}}", "x".repeat(PAYLOAD_BYTES - head.len() - 2))
}

fn insert_messages(store: &mut dyn Store, n: usize) {
    let now = store::now_ms();
    let mut i = 0;
    while i < n {
        let batch: Vec<NewMessage> = (i..n.min(i + 50_000))
            .map(|k| NewMessage {
                topic: "t".into(),
                account: format!("a{}", k % ACCOUNTS),
                payload: payload(k),
                priority: 0,
                created_at: now,
                available_at: None,
                dedup_key: None,
                expires_at: None,
                ordering_key: None,
            })
            .collect();
        i += batch.len();
        store.messages_insert(&batch).unwrap();
    }
}

// ---------------------------------------------------------------- measures

/// What `cronpost run` said and how long it took.
struct RunReport {
    took: Duration,
    parent_mib: f64,
    child_mib: f64,
    log: String,
}

/// Runs `cronpost run` on `config`.
fn cronpost_run(config: &Path) -> RunReport {
    let started = Instant::now();
    let out = Command::new(BIN)
        .arg("run")
        .env("CRONPOST_CONFIG", config)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let took = started.elapsed();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "cronpost run failed: {log}");
    let mib = |after: &str| -> f64 {
        let at = log
            .find(after)
            .unwrap_or_else(|| panic!("no {after:?} in {log}"));
        let text = log[..at].trim_end().rsplit(' ').next().unwrap();
        text.parse().unwrap()
    };
    RunReport {
        took,
        parent_mib: mib(" MiB parent"),
        child_mib: mib(" MiB child"),
        log,
    }
}

/// Runs this executable in another `role`; returns its stdout.
fn run_role(args: &[&str]) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// The median of `repeats` runs of `f`, and every reading.
fn repeat(repeats: usize, mut f: impl FnMut() -> f64) -> (f64, Vec<f64>) {
    let xs: Vec<f64> = (0..repeats).map(|_| f()).collect();
    (median(xs.clone()), xs)
}

/// `requests` POSTs of 512 bytes from `threads` threads, each on a new
/// connection with `connection: close` (as children send them), waiting
/// for the receiver to close first; requests per second.
fn receiver_ceiling(url: &str, requests: usize, threads: usize) -> f64 {
    let addr = url.trim_start_matches("http://").to_string();
    let body = payload(0);
    let request = format!(
        "POST /hook HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\ncontent-type: application/json\r\nwebhook-id: msg_0123456789abcdef01234567\r\nwebhook-timestamp: 1700000000\r\nwebhook-signature: v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for _ in 0..requests / threads {
                    let mut stream = TcpStream::connect(&addr).unwrap();
                    stream.write_all(request.as_bytes()).unwrap();
                    let mut answer = Vec::new();
                    stream.read_to_end(&mut answer).unwrap();
                    assert!(answer.starts_with(b"HTTP/1.1 200"));
                }
            });
        }
    });
    requests as f64 / started.elapsed().as_secs_f64()
}

/// Drives the child's lease → POST → record (`child::deliver_one`) in this
/// process, with one database connection and one HTTP client, until the
/// queue is empty; deliveries per second.
fn no_fork(config: &Path, client: &mut cronpost::delivery::Client) -> f64 {
    use cronpost::child::{self, ChildContext, ChildExit};
    let config = Config::load(config).unwrap();
    let mut store = store::open_existing(&config).unwrap();
    let started = Instant::now();
    let mut delivered = 0;
    loop {
        let ctx = ChildContext {
            owner: format!("no-fork.{delivered}"),
            run_id: 0,
            prefer: store::Queue::Ready,
            boot_id: cronpost::clock::boot_id(),
            deadline: Instant::now() + config.run.child_deadline,
        };
        match child::deliver_one(store.as_mut(), client, &config, &ctx, &mut |_| {}).unwrap() {
            ChildExit::Delivered => delivered += 1,
            ChildExit::Empty => break,
            other => panic!("no-fork delivery ended {other:?}"),
        }
    }
    delivered as f64 / started.elapsed().as_secs_f64()
}

/// Leases and records `n` deliveries (no HTTP), on a new connection each
/// (as children do) or all on one; per second.
fn lease_record_rate(config: &Path, n: usize, fresh: bool) -> f64 {
    use cronpost::store::{AttemptOutcome, FinishAttempt, LeaseParams};
    let config = Config::load(config).unwrap();
    let open = || store::open_existing(&config).unwrap();
    // Open all along, as the keeper is in a run.
    let _held_open = store::open(&config).unwrap();
    let mut store = open();
    let started = Instant::now();
    for i in 0..n {
        if fresh {
            store = open();
        }
        let now = store::now_ms();
        let lease = store
            .delivery_lease_next(&LeaseParams {
                owner: format!("scale.{i}"),
                pid: std::process::id(),
                run_id: None,
                now,
                lease_timeout_ms: 60_000,
                prefer: store::Queue::Ready,
                policy: &config,
                boot: None,
            })
            .unwrap()
            .expect("a ready delivery");
        let finish = FinishAttempt::delivered(&lease, now, AttemptOutcome::Delivered);
        assert!(store.attempt_finish(&finish).unwrap());
    }
    n as f64 / started.elapsed().as_secs_f64()
}

struct Options {
    quick: bool,
    repeats: usize,
    only: Option<String>,
}

impl Options {
    fn wants(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == name)
    }
}

/// The table's rows: measure, result, every reading.
struct Table(Vec<(String, String, String)>);

impl Table {
    fn row(&mut self, what: String, result: String, readings: &[f64]) {
        let readings: Vec<String> = readings
            .iter()
            .map(|r| match *r {
                r if r < 10.0 => format!("{r:.2}"),
                r if r < 100.0 => format!("{r:.1}"),
                r => format!("{r:.0}"),
            })
            .collect();
        eprintln!("{what}: {result} ({})", readings.join(", "));
        self.0.push((what, result, readings.join(", ")));
    }
}

// ---------------------------------------------------------------- latency

/// How a message is published, for latency.
#[derive(Clone, Copy)]
enum Publish {
    /// `cronpost enqueue` (a process per message), timed from its start.
    Cli,
    /// An INSERT on a connection the producer keeps open.
    Sql,
}

/// p50, p95 and max of milliseconds, as a table cell.
fn percentiles(mut ms: Vec<f64>) -> (String, Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    let (p50, p95, max) = (at(0.5), at(0.95), at(1.0));
    (
        format!("p50 {p50:.1} ms / p95 {p95:.1} ms / max {max:.1} ms"),
        vec![p50, p95, max],
    )
}

/// Publishes `count` messages one at a time, each once the one before
/// arrived (and 10 ms later); returns each one's latency, publication (the
/// producer's call returned: the message is committed) to arrival, in ms,
/// and the same from the start of the producer's call.
fn one_at_a_time(
    config: &Path,
    rx: &StampReceiver,
    how: Publish,
    tag: &str,
    count: usize,
    priority: i64,
) -> (Vec<f64>, Vec<f64>) {
    let db = Config::load(config)
        .unwrap()
        .database
        .sqlite_path()
        .unwrap()
        .to_path_buf();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut insert = |uid: &str, tag: &str, priority: i64| {
        conn.execute(
            "INSERT INTO messages (uid, topic, account, payload, priority) VALUES (?1, 't', ?2, '{}', ?3)",
            rusqlite::params![uid, tag, priority],
        )
        .unwrap();
    };
    publish_one_at_a_time(config, rx, how, tag, count, priority, &mut insert)
}

/// [`one_at_a_time`] on any backend: `insert(uid, account, priority)`
/// is the producer's plain SQL INSERT on a connection it keeps.
fn publish_one_at_a_time(
    config: &Path,
    rx: &StampReceiver,
    how: Publish,
    tag: &str,
    count: usize,
    priority: i64,
    insert: &mut dyn FnMut(&str, &str, i64),
) -> (Vec<f64>, Vec<f64>) {
    (0..count)
        .map(|k| {
            let called = epoch_us();
            let uid = match how {
                Publish::Cli => {
                    let out = Command::new(BIN)
                        .args([
                            "enqueue",
                            "--topic",
                            "t",
                            "--account",
                            tag,
                            "--json",
                            "--data",
                            "{}",
                        ])
                        .args(["--priority", &priority.to_string()])
                        .env("CRONPOST_CONFIG", config)
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    json["messages"][0]["uid"].as_str().unwrap().to_string()
                }
                Publish::Sql => {
                    let uid = format!("lat-{tag}-{k}");
                    insert(&uid, tag, priority);
                    uid
                }
            };
            let published = epoch_us();
            let arrived = rx.arrival(&uid);
            std::thread::sleep(Duration::from_millis(10));
            (
                arrived.saturating_sub(published) as f64 / 1000.0,
                arrived.saturating_sub(called) as f64 / 1000.0,
            )
        })
        .unzip()
}

/// CPU seconds (user + system) of `pid` and its children now.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let fields: Vec<String> = stat[stat.rfind(')')? + 2..]
                    .split(' ')
                    .map(str::to_string)
                    .collect();
                Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
            })
            .unwrap_or(0)
    };
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                stat.rfind(')')
                    .is_some_and(|i| stat[i + 2..].split(' ').nth(1) == Some(&pid.to_string()))
            })
        })
        .collect();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (ticks(pid) + children.into_iter().map(ticks).sum::<u64>()) as f64 / hz
}

/// Starts `cronpost ARGS` on `config` and waits until its log says `ready`.
fn start_cronpost(config: &Path, args: &[&str], ready: &str) -> Child {
    let log = config.with_extension("log");
    let child = Command::new(BIN)
        .args(args)
        .env("CRONPOST_CONFIG", config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(ready)
    {
        assert!(
            Instant::now() < deadline,
            "cronpost {args:?} did not say {ready:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

/// Latency: the daemon and the lingering oneshot, idle, for messages
/// published one at a time with the CLI and with plain SQL; a high
/// priority during a drain of `n`; the idle daemon's CPU.
fn latency(options: &Options, n: usize, table: &mut Table) {
    let rx = StampReceiver::start();
    let bench = Bench::new(&rx.url);
    let count = if options.quick { 40 } else { 200 };
    let idle = Duration::from_secs(if options.quick { 10 } else { 60 });
    for (who, args, ready) in [
        (
            "daemon (schedule never due)",
            &["daemon"][..],
            "daemon started",
        ),
        ("cronpost run --linger", &["run", "--linger"], "routed"),
    ] {
        let config = bench.config(who.split(' ').next().unwrap(), "latency.db", 4, 1);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text = format!("schedule = \"0 0 0 1 1 *\"\n{text}");
        std::fs::write(&config, text).unwrap();
        bench.remove_db("latency");
        let out = Command::new(BIN)
            .arg("migrate")
            .env("CRONPOST_CONFIG", &config)
            .output()
            .unwrap();
        assert!(out.status.success());
        let process = if who.starts_with("daemon") {
            start_cronpost(&config, args, ready)
        } else {
            let child = Command::new(BIN)
                .args(args)
                .env("CRONPOST_CONFIG", &config)
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // The run has begun once it wrote its runs row.
            let db = Config::load(&config)
                .unwrap()
                .database
                .sqlite_path()
                .unwrap()
                .to_path_buf();
            let deadline = Instant::now() + Duration::from_secs(30);
            while rusqlite::Connection::open(&db)
                .and_then(|c| c.query_row("SELECT count(*) FROM runs", [], |r| r.get::<_, i64>(0)))
                .unwrap_or(0)
                == 0
            {
                assert!(Instant::now() < deadline, "the lingering run did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            child
        };
        for (how, name) in [
            (Publish::Cli, "cronpost enqueue"),
            (Publish::Sql, "plain SQL INSERT"),
        ] {
            let tag = format!("{}{}", who.len(), name.len());
            let (ms, from_call) = one_at_a_time(&config, &rx, how, &tag, count, 0);
            let (cell, xs) = percentiles(ms);
            let (call_cell, _) = percentiles(from_call);
            table.row(
                format!("latency, {who} idle: {count} messages one at a time by {name}, publication (commit) to arrival"),
                format!("{cell} (from the start of the producer's call: {call_cell})"),
                &xs,
            );
        }
        if who.starts_with("daemon") {
            let before = cpu_seconds(process.id());
            let started = Instant::now();
            std::thread::sleep(idle);
            let used = cpu_seconds(process.id()) - before;
            let share = 100.0 * used / started.elapsed().as_secs_f64();
            table.row(
                format!("idle daemon and its keeper over {}s: CPU", idle.as_secs()),
                format!("{share:.2}% of a core ({used:.2} s)"),
                &[share],
            );
        }
        stop(process);
    }

    // A high priority while a backlog drains.
    let config = bench.copy_of("drain", n, 8);
    let run = Command::new(BIN)
        .arg("run")
        .env("CRONPOST_CONFIG", &config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rx.count() < n / 10 {
        assert!(Instant::now() < deadline, "the drain did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let urgent = if options.quick { 10 } else { 40 };
    let (ms, from_call) = one_at_a_time(&config, &rx, Publish::Sql, "urgent", urgent, 1000);
    let drained = rx.count();
    let (cell, xs) = percentiles(ms);
    let (call_cell, _) = percentiles(from_call);
    let cell = format!("{cell} (from the start of the INSERT: {call_cell})");
    table.row(
        format!(
            "latency of priority 1000 while {n} deliveries drain (8 children): {urgent} plain SQL INSERTs one at a time"
        ),
        format!("{cell}; {drained} of the backlog had arrived by the last"),
        &xs,
    );
    stop(run);
}

/// The receiver's own ceiling: what no dispatcher can beat.
fn receiver_ceiling_section(setup: &mut Setup, table: &mut Table) {
    let requests = if setup.options.quick { 5_000 } else { 20_000 };
    let (rate, xs) = repeat(setup.options.repeats, || {
        receiver_ceiling(&setup.receiver.url, requests, 4)
    });
    table.row(
        format!("receiver ceiling: {requests} POSTs, a new connection each, 4 client threads"),
        format!("{rate:.0} requests/s"),
        &xs,
    );
}

/// The main figure: a run draining `n` deliveries, fork per delivery, at
/// each max_children. Returns the best (max_children, deliveries/s).
fn drain(setup: &mut Setup, table: &mut Table) -> Best {
    let mut best = (0, 0.0);
    for children in [1, 2, 4, 8, 16] {
        let (rate, xs) = repeat(setup.options.repeats, || {
            let config = setup.bench.copy_of("drain", setup.n, children);
            let before = setup.receiver.count();
            let report = cronpost_run(&config);
            assert_eq!(
                (setup.receiver.count() - before) as usize,
                setup.n,
                "{}",
                report.log
            );
            setup.n as f64 / report.took.as_secs_f64()
        });
        if rate > best.1 {
            best = (children, rate);
        }
        table.row(
            format!(
                "fork per delivery: {} deliveries, max_children {children}",
                setup.n
            ),
            format!("{rate:.0} deliveries/s"),
            &xs,
        );
    }
    best
}

/// The same drain in one process without forking, kept-alive and not:
/// what forking costs, against the best drain.
fn no_fork_section(setup: &Setup, best: Best, table: &mut Table) {
    for (name, keep_alive) in [
        ("one kept-alive connection", true),
        ("a new connection per delivery", false),
    ] {
        let (rate, xs) = repeat(setup.options.repeats, || {
            let config = setup.bench.copy_of("drain", setup.n, 1);
            let mut client = if keep_alive {
                cronpost::delivery::Client::keep_alive()
            } else {
                cronpost::delivery::Client::one_shot()
            };
            no_fork(&config, &mut client)
        });
        let ratio = if best.1 > 0.0 {
            format!(
                "; fork per delivery at max_children {} is {:.0}% of it",
                best.0,
                100.0 * best.1 / rate
            )
        } else {
            String::new()
        };
        table.row(
            format!("no fork (bench harness): lease → POST → record in one process, {name}"),
            format!("{rate:.0} deliveries/s{ratio}"),
            &xs,
        );
    }
}

/// fork + POST + exit without SQLite in the child: the ceiling of forking.
fn fork_post_section(setup: &Setup, table: &mut Table) {
    let count = if setup.options.quick { 2_000 } else { setup.n };
    for children in [1, 8] {
        let (rate, xs) = repeat(setup.options.repeats, || {
            let config = setup.bench.copy_of("drain", setup.n, 1);
            run_role(&[
                "fork-post",
                config.to_str().unwrap(),
                &count.to_string(),
                &children.to_string(),
            ])
            .trim()
            .parse()
            .unwrap()
        });
        table.row(
            format!(
                "fork + POST + exit, no SQLite in the child (bench harness), {children} at a time"
            ),
            format!("{rate:.0} deliveries/s"),
            &xs,
        );
    }
}

/// Where a child's time goes, step by step.
fn steps_section(setup: &Setup, table: &mut Table) {
    let per_run = if setup.options.quick { 300 } else { 2_000 };
    let runs: Vec<Vec<f64>> = (0..setup.options.repeats)
        .map(|_| {
            let config = setup.bench.copy_of("drain", setup.n, 1);
            run_role(&["steps", config.to_str().unwrap(), &per_run.to_string()])
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect()
        })
        .collect();
    for (k, name) in STEP_NAMES.iter().enumerate() {
        let xs: Vec<f64> = runs.iter().map(|run| run[k]).collect();
        table.row(
            format!("child step (median of {per_run} sequential children): {name}"),
            format!("{:.0} µs", median(xs.clone())),
            &xs,
        );
    }
}

/// Lease + record against a small and a big backlog, and the peak RSS
/// of parent and children: the queue's size must not show in either.
fn scale(setup: &Setup, table: &mut Table) {
    let ops = if setup.options.quick { 1_000 } else { 5_000 };
    let mut rates = Vec::new();
    for backlog in [10_000, setup.big] {
        let name = format!("backlog{backlog}");
        for (fresh, how) in [
            (true, "a new connection per delivery, as children"),
            (false, "one connection"),
        ] {
            let (rate, xs) = repeat(setup.options.repeats, || {
                let config = setup.bench.copy_of(&name, backlog, 1);
                lease_record_rate(&config, ops, fresh)
            });
            rates.push(rate);
            table.row(
                format!("lease + record (no HTTP), {how}, {backlog} ready deliveries"),
                format!("{rate:.0} deliveries/s"),
                &xs,
            );
        }
        let mut child = Vec::new();
        let (parent, xs) = repeat(setup.options.repeats, || {
            let config = setup.bench.copy_of(&name, backlog, 4);
            let text = std::fs::read_to_string(&config).unwrap();
            let text = text.replace("max_messages = 10000000", "max_messages = 2000");
            std::fs::write(&config, text).unwrap();
            let report = cronpost_run(&config);
            child.push(report.child_mib);
            report.parent_mib
        });
        table.row(
            format!("peak RSS of the parent, {backlog} ready deliveries (a run of 2,000)"),
            format!("{parent:.1} MiB"),
            &xs,
        );
        table.row(
            format!("peak RSS of the largest child, {backlog} ready deliveries"),
            format!("{:.1} MiB", median(child.clone())),
            &child,
        );
    }
    table.row(
        format!(
            "lease + record rate at {} vs 10,000 ready: new connections / one connection",
            setup.big
        ),
        format!("{:.2}x / {:.2}x", rates[2] / rates[0], rates[3] / rates[1]),
        &[],
    );
}

/// Publishing: NDJSON in bulk, and one process per message.
fn enqueue(setup: &Setup, table: &mut Table) {
    let count = if setup.options.quick { 20_000 } else { 100_000 };
    let ndjson = setup.bench.dir.path().join("messages.ndjson");
    let mut text = String::new();
    for i in 0..count {
        text.push_str(&format!(
            "{{\"topic\":\"t\",\"account\":\"a{}\",\"payload\":{}}}\n",
            i % ACCOUNTS,
            payload(i)
        ));
    }
    std::fs::write(&ndjson, text).unwrap();
    let (rate, xs) = repeat(setup.options.repeats, || {
        let config = setup.bench.config("enqueue", "enqueue.db", 1, 1);
        setup.bench.remove_db("enqueue");
        let started = Instant::now();
        let status = Command::new(BIN)
            .args(["enqueue", "--ndjson"])
            .env("CRONPOST_CONFIG", &config)
            .stdin(std::fs::File::open(&ndjson).unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        count as f64 / started.elapsed().as_secs_f64()
    });
    table.row(
        format!("enqueue --ndjson, {count} messages of 512 bytes"),
        format!("{rate:.0} messages/s"),
        &xs,
    );
    let calls = if setup.options.quick { 100 } else { 500 };
    let (rate, xs) = repeat(setup.options.repeats, || {
        let config = setup.bench.config("enqueue", "enqueue.db", 1, 1);
        let started = Instant::now();
        for i in 0..calls {
            let status = Command::new(BIN)
                .args([
                    "enqueue",
                    "--topic",
                    "t",
                    "--account",
                    "a1",
                    "--data",
                    &payload(i),
                ])
                .env("CRONPOST_CONFIG", &config)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
        }
        calls as f64 / started.elapsed().as_secs_f64()
    });
    table.row(
        format!("one `cronpost enqueue` process per message, {calls} in a row"),
        format!("{rate:.0} messages/s"),
        &xs,
    );
}

/// Routing a backlog of messages to three endpoints.
fn route(setup: &Setup, table: &mut Table) {
    let count = if setup.options.quick { 20_000 } else { 100_000 };
    let (seconds, xs) = repeat(setup.options.repeats, || {
        let config = setup.bench.config("route", "route.db", 1, 3);
        setup.bench.remove_db("route");
        let config = Config::load(&config).unwrap();
        let mut store = store::open(&config).unwrap();
        insert_messages(store.as_mut(), count);
        store
            .subscriptions_replace(&cronpost::routing::subscriptions(&config))
            .unwrap();
        let started = Instant::now();
        let report =
            cronpost::routing::route_all(store.as_mut(), store::now_ms(), &mut || {}).unwrap();
        assert_eq!(report.deliveries, 3 * count);
        started.elapsed().as_secs_f64()
    });
    table.row(
        format!(
            "route {count} messages to 3 endpoints ({} deliveries)",
            3 * count
        ),
        format!("{seconds:.2} s"),
        &xs,
    );
}

/// A long run at the best drain's max_children, and the TIME_WAIT
/// sockets it leaves.
fn sustained(setup: &mut Setup, best: Best, table: &mut Table) {
    let long = if setup.options.quick { 6_000 } else { 60_000 };
    // The drain's best max_children; 8 when the drain did not run (--only).
    let children = if best.0 > 0 { best.0 } else { 8 };
    let mut waits = Vec::new();
    let (rate, xs) = repeat(setup.options.repeats, || {
        let config = setup.bench.copy_of("sustained", long, children);
        let before = setup.receiver.count();
        let report = cronpost_run(&config);
        assert_eq!(
            (setup.receiver.count() - before) as usize,
            long,
            "{}",
            report.log
        );
        waits.push(tcp::time_wait(setup.port));
        long as f64 / report.took.as_secs_f64()
    });
    table.row(
        format!("sustained: {long} deliveries in one run, max_children {children}"),
        if best.1 > 0.0 {
            format!(
                "{rate:.0} deliveries/s = {:.0}% of the {}-delivery rate",
                100.0 * rate / best.1,
                setup.n
            )
        } else {
            format!("{rate:.0} deliveries/s")
        },
        &xs,
    );
    let (server, client) = waits.last().copied().unwrap_or_default();
    table.row(
        "TIME_WAIT sockets right after it: receiver side / client side".into(),
        format!("{server} / {client}"),
        &[],
    );
}

/// What every section shares.
struct Setup {
    options: Options,
    receiver: Receiver,
    /// The receiver's port, for counting its TIME_WAIT sockets.
    port: u16,
    bench: Bench,
    /// The drain's size.
    n: usize,
    /// The big backlog's size.
    big: usize,
}

/// The best drain: (max_children, deliveries/s), (0, 0.0) when it did not run.
type Best = (usize, f64);

fn orchestrate(args: &[String]) {
    let quick = args.iter().any(|a| a == "--quick");
    let options = Options {
        quick,
        repeats: if quick { 1 } else { 3 },
        only: args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1).cloned()),
    };
    let receiver = Receiver::start();
    let port: u16 = receiver.url.rsplit(':').next().unwrap().parse().unwrap();
    let bench = Bench::new(&receiver.url);
    let mut setup = Setup {
        n: if quick { 2_000 } else { 20_000 },
        big: if quick { 100_000 } else { 1_000_000 },
        options,
        receiver,
        port,
        bench,
    };
    let mut table = Table(Vec::new());
    if setup.options.wants("receiver") {
        receiver_ceiling_section(&mut setup, &mut table);
    }
    let best = if setup.options.wants("drain") {
        drain(&mut setup, &mut table)
    } else {
        (0, 0.0)
    };
    if setup.options.wants("nofork") {
        no_fork_section(&setup, best, &mut table);
    }
    if setup.options.wants("forkpost") {
        fork_post_section(&setup, &mut table);
    }
    if setup.options.wants("steps") {
        steps_section(&setup, &mut table);
    }
    if setup.options.wants("scale") {
        scale(&setup, &mut table);
    }
    if setup.options.wants("enqueue") {
        enqueue(&setup, &mut table);
    }
    if setup.options.wants("route") {
        route(&setup, &mut table);
    }
    if setup.options.wants("sustained") {
        sustained(&mut setup, best, &mut table);
    }
    if setup.options.wants("latency") {
        latency(&setup.options, setup.n, &mut table);
    }
    if setup.options.wants("adaptive") {
        adaptive::section(&setup.options, &mut table);
    }
    if setup.options.wants("postgres") {
        postgres::section(&mut setup, &mut table);
    }
    if setup.options.wants("postgres-scale") {
        postgres::scale_section(&mut setup, &mut table);
    }
    if setup.options.wants("postgres-latency") {
        postgres::latency_section(&setup.options, &mut table);
    }

    println!("| measure | result | readings |\n|---|---|---|");
    for (what, result, readings) in table.0 {
        println!("| {what} | {result} | {readings} |");
    }
}
