//! The adaptive-rate section (`--only adaptive`): a receiver whose
//! /limited path answers 429 (`Retry-After: 1`) to a request over its limit
//! in the last second (a sliding window, counting what it accepted, or
//! every request as many limiters do), and whose /healthy path answers 200,
//! both at once, drained by a live daemon
//! (8 children): how close to the limit the limited endpoint is driven,
//! how many requests it refuses, what the healthy one drains in with and
//! without it; a limit that drops halfway (100/s to 20/s): how soon the
//! learned rate follows, and the refusals after the drop; the same drain
//! with `adaptive = false`, as before the learned rates; a long drain:
//! how often a limit once learned is crossed again.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::*;

/// What the limited receiver has seen.
#[derive(Default)]
struct Limiter {
    /// Accepted requests on /limited a second (the limit in force).
    limit: usize,
    /// After this many accepted, the limit becomes `then` (a drop).
    drop_after: Option<(u64, usize)>,
    /// Whether refused requests count against the limit too (as many
    /// limiters count every request), or only accepted ones.
    count_refused: bool,
    /// When each of the last second's counted requests came.
    window: VecDeque<Instant>,
    accepted: u64,
    refused: u64,
    /// Refused since the drop.
    refused_after_drop: u64,
    /// Times the limit was crossed: refusals more than a second after the
    /// last one.
    crossings: u64,
    last_refused: Option<Instant>,
    healthy: u64,
    /// When the first and last accepted /limited and /healthy requests came.
    first: [Option<Instant>; 2],
    last: [Option<Instant>; 2],
    /// When the limit dropped.
    dropped_at: Option<Instant>,
}

impl Limiter {
    /// The answer to one request to `path`.
    fn answer(&mut self, path: &str) -> u16 {
        let now = Instant::now();
        let i = if path.starts_with("/limited") { 0 } else { 1 };
        if i == 1 {
            self.healthy += 1;
            self.first[1].get_or_insert(now);
            self.last[1] = Some(now);
            return 200;
        }
        while self
            .window
            .front()
            .is_some_and(|&t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.window.pop_front();
        }
        if self.window.len() >= self.limit {
            if self.count_refused {
                self.window.push_back(now);
            }
            self.refused += 1;
            if self
                .last_refused
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(1))
            {
                self.crossings += 1;
            }
            self.last_refused = Some(now);
            if self.dropped_at.is_some() {
                self.refused_after_drop += 1;
            }
            return 429;
        }
        self.window.push_back(now);
        self.accepted += 1;
        self.first[0].get_or_insert(now);
        self.last[0] = Some(now);
        if let Some((after, then)) = self.drop_after
            && self.accepted == after
        {
            self.limit = then;
            self.dropped_at = Some(now);
        }
        200
    }

    /// The counts as the orchestrator reads them: accepted, refused,
    /// refused after the drop, healthy, and the ms from the first to the
    /// last accepted of /limited and of /healthy, and from the first
    /// /limited to the drop; the crossings.
    fn report(&self) -> String {
        let span = |i: usize| match (self.first[i], self.last[i]) {
            (Some(a), Some(b)) => b.duration_since(a).as_millis(),
            _ => 0,
        };
        let dropped = match (self.first[0], self.dropped_at) {
            (Some(a), Some(b)) => b.duration_since(a).as_millis(),
            _ => 0,
        };
        format!(
            "{} {} {} {} {} {} {dropped} {}",
            self.accepted,
            self.refused,
            self.refused_after_drop,
            self.healthy,
            span(0),
            span(1),
            self.crossings
        )
    }
}

/// The limited receiver role: `limited-receive LIMIT accepted|all [AFTER
/// THEN]` (what counts against the limit). Prints its URL, then a report
/// line (see [`Limiter::report`]) whenever stdin gets a line.
pub fn limited_receive(args: &[String]) {
    let limiter = Arc::new(Mutex::new(Limiter {
        limit: args[0].parse().unwrap(),
        count_refused: args[1] == "all",
        drop_after: args
            .get(2)
            .map(|after| (after.parse().unwrap(), args[3].parse().unwrap())),
        ..Limiter::default()
    }));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    for _ in 0..8 {
        let listener = listener.try_clone().expect("clone listener");
        let limiter = limiter.clone();
        std::thread::spawn(move || {
            loop {
                if let Ok((stream, _)) = listener.accept() {
                    serve_connection_answering(stream, &mut |head| {
                        let path = head.split_whitespace().nth(1).unwrap_or("");
                        limiter.lock().unwrap().answer(path)
                    });
                }
            }
        });
    }
    println!("http://{}", listener.local_addr().unwrap());
    for _ in std::io::stdin().lock().lines() {
        println!("{}", limiter.lock().unwrap().report());
    }
}

/// What a limited receiver counts against its limit.
#[derive(Clone, Copy)]
enum Counts {
    /// The requests it accepted in the last second.
    Accepted,
    /// Every request in the last second, refused ones too.
    All,
}

impl Counts {
    fn arg(self) -> &'static str {
        match self {
            Counts::Accepted => "accepted",
            Counts::All => "all",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Counts::Accepted => "counting what it accepted in the last second",
            Counts::All => "counting every request of the last second, refused ones too",
        }
    }
}

/// A limited receiver process.
struct Limited(Receiver);

/// What a limited receiver reported.
struct Report {
    accepted: u64,
    refused: u64,
    refused_after_drop: u64,
    healthy: u64,
    limited_ms: u64,
    healthy_ms: u64,
    dropped_ms: u64,
    crossings: u64,
    /// The limited endpoint's learned rate, first and last.
    learned: (Option<f64>, Option<f64>),
}

impl Limited {
    fn start(limit: usize, counts: Counts, drop: Option<(usize, usize)>) -> Limited {
        let mut args = vec![
            "limited-receive".to_string(),
            limit.to_string(),
            counts.arg().to_string(),
        ];
        if let Some((after, then)) = drop {
            args.extend([after.to_string(), then.to_string()]);
        }
        Limited(Receiver::start_role(&args))
    }

    fn url(&self) -> &str {
        &self.0.url
    }

    fn report(&mut self) -> Report {
        let n: Vec<u64> = self
            .0
            .ask()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        Report {
            accepted: n[0],
            refused: n[1],
            refused_after_drop: n[2],
            healthy: n[3],
            limited_ms: n[4],
            healthy_ms: n[5],
            dropped_ms: n[6],
            crossings: n[7],
            learned: (None, None),
        }
    }
}

/// A scratch queue: `limited` and `healthy` messages to the endpoints of
/// those names (8 children, a daemon on the example schedule, every 5 s); `adaptive`
/// for the limited one. Returns the config's path.
fn queue(
    dir: &Path,
    url: &str,
    limited: usize,
    healthy: usize,
    adaptive: bool,
) -> (PathBuf, PathBuf) {
    let db = dir.join("adaptive.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let config = dir.join("adaptive.toml");
    std::fs::write(
        &config,
        format!(
            "database = \"adaptive.db\"\nschedule = \"*/5 * * * * *\"\n[run]\nmax_children = 8\nmax_messages = 10000000\nmax_runtime = \"1h\"\n\
             [endpoints.limited]\nurl = \"{url}/limited\"\ntopics = [\"l\"]\nsecret = \"{SECRET}\"\nadaptive = {adaptive}\n\
             [endpoints.healthy]\nurl = \"{url}/healthy\"\ntopics = [\"h\"]\nsecret = \"{SECRET}\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut store = store::open(&Config::load(&config).unwrap()).unwrap();
    let now = store::now_ms();
    let messages: Vec<NewMessage> = (0..limited + healthy)
        .map(|i| NewMessage {
            topic: if i < limited { "l" } else { "h" }.into(),
            account: format!("a{}", i % ACCOUNTS),
            payload: payload(i),
            priority: 0,
            created_at: now,
            available_at: None,
            dedup_key: None,
            expires_at: None,
            ordering_key: None,
        })
        .collect();
    store.messages_insert(&messages).unwrap();
    (config, db)
}

/// Runs a daemon on a fresh queue until the receiver has accepted
/// `limited` and `healthy`; calls `watch` with the database and the
/// receiver's report every 20 ms meanwhile.
fn drain(
    rx: &mut Limited,
    dir: &Path,
    (limited, healthy): (usize, usize),
    adaptive: bool,
    mut watch: impl FnMut(&Path, &Report),
) -> Report {
    let (config, db) = queue(dir, rx.url(), limited, healthy, adaptive);
    let daemon = start_cronpost(&config, &["daemon"], "daemon started");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first_learned = None;
    let mut report = loop {
        if first_learned.is_none() {
            first_learned = learned_rate(&db);
        }
        let report = rx.report();
        if report.accepted as usize >= limited && report.healthy as usize >= healthy
            || Instant::now() > deadline
        {
            break report;
        }
        watch(&db, &report);
        std::thread::sleep(Duration::from_millis(20));
    };
    stop(daemon);
    report.learned = (first_learned, learned_rate(&db));
    assert!(
        report.accepted as usize >= limited && report.healthy as usize >= healthy,
        "the drain did not end in 10 minutes"
    );
    report
}

/// The learned rate of `limited`, if any.
fn learned_rate(db: &Path) -> Option<f64> {
    rusqlite::Connection::open(db)
        .and_then(|c| {
            c.query_row(
                "SELECT learned_rate FROM endpoint_health WHERE endpoint = 'limited'",
                [],
                |r| r.get(0),
            )
        })
        .ok()
        .flatten()
}

pub fn section(options: &Options, table: &mut Table) {
    let dir = tempfile::tempdir().unwrap();
    let n = if options.quick { 500 } else { 2_000 };
    let limit = 100;
    let rate = |count: u64, ms: u64| count as f64 * 1000.0 / ms.max(1) as f64;

    for counts in [Counts::Accepted, Counts::All] {
        for adaptive in [true, false] {
            let mut runs = Vec::new();
            for _ in 0..options.repeats {
                let mut rx = Limited::start(limit, counts, None);
                runs.push(drain(&mut rx, dir.path(), (n, n), adaptive, |_, _| {}));
            }
            let rates: Vec<f64> = runs
                .iter()
                .map(|r| rate(r.accepted, r.limited_ms))
                .collect();
            let refusals: Vec<f64> = runs
                .iter()
                .map(|r| 100.0 * r.refused as f64 / (r.accepted + r.refused) as f64)
                .collect();
            let (limited_rate, refused) = (median(rates.clone()), median(refusals.clone()));
            let healthy_s = median(runs.iter().map(|r| r.healthy_ms as f64 / 1000.0).collect());
            let crossings: Vec<String> = runs.iter().map(|r| r.crossings.to_string()).collect();
            let learned = match runs.last().map(|r| r.learned) {
                Some((Some(first), Some(last))) => {
                    format!(
                        " (last run: learned {first:.1}/s at the first 429, {last:.1}/s at the end; limit crossed {} times)",
                        crossings.join(", ")
                    )
                }
                _ => format!(" (limit crossed {} times)", crossings.join(", ")),
            };
            let target = if adaptive {
                let met = limited_rate >= 0.9 * limit as f64 && refused <= 2.0;
                format!("; target ≥ 90% and ≤ 2% refused: {}", met_or_not(met))
            } else {
                String::new()
            };
            let mut readings = rates;
            readings.extend(refusals);
            table.row(
                format!(
                    "adaptive = {adaptive}: {n} deliveries to an endpoint answering 429 above {limit}/s ({}), {n} to a healthy one beside it (daemon, 8 children; median of {})",
                    counts.describe(),
                    options.repeats
                ),
                format!(
                    "limited: {limited_rate:.0}/s = {:.0}% of its limit{learned}, {refused:.1}% of its requests refused; healthy: {n} in {healthy_s:.1}s{target}",
                    100.0 * limited_rate / limit as f64
                ),
                &readings,
            );
        }
    }

    // A long drain: how often a fixed limit is crossed again once learned.
    let long = if options.quick { 3_000 } else { 10_000 };
    let mut rx = Limited::start(limit, Counts::Accepted, None);
    let r = drain(&mut rx, dir.path(), (long, 0), true, |_, _| {});
    let long_rate = rate(r.accepted, r.limited_ms);
    let long_refused = 100.0 * r.refused as f64 / (r.accepted + r.refused) as f64;
    let minutes = r.limited_ms as f64 / 60_000.0;
    table.row(
        format!(
            "adaptive = true: {long} deliveries to an endpoint answering 429 above {limit}/s ({}), alone (one drain)",
            Counts::Accepted.describe()
        ),
        format!(
            "{long_rate:.0}/s = {:.0}% of its limit, {long_refused:.2}% of its requests refused; limit crossed {} times in {minutes:.1} min",
            100.0 * long_rate / limit as f64,
            r.crossings
        ),
        &[long_rate, long_refused, r.crossings as f64],
    );

    let mut rx = Limited::start(limit, Counts::Accepted, None);
    let alone = drain(&mut rx, dir.path(), (0, n), true, |_, _| {});
    table.row(
        format!("the healthy endpoint alone: {n} deliveries"),
        format!("{n} in {:.1}s", alone.healthy_ms as f64 / 1000.0),
        &[alone.healthy_ms as f64 / 1000.0],
    );

    // The limit drops to 20/s after half the deliveries.
    let (after, then) = (n / 2, 20);
    let mut rx = Limited::start(limit, Counts::Accepted, Some((after, then)));
    let mut dropped_seen: Option<Instant> = None;
    let mut followed: Option<Duration> = None;
    let r = drain(&mut rx, dir.path(), (n, 0), true, |db, report| {
        if report.dropped_ms == 0 {
            return;
        }
        let at = *dropped_seen.get_or_insert_with(Instant::now);
        if followed.is_none() && learned_rate(db).is_some_and(|r| r <= then as f64 * 1.1) {
            followed = Some(at.elapsed());
        }
    });
    let met = followed.is_some_and(|d| d < Duration::from_secs(5));
    let followed = followed.map_or("never".to_string(), |d| format!("{:.1}s", d.as_secs_f64()));
    let after_rate = rate(r.accepted - after as u64, r.limited_ms - r.dropped_ms);
    let refused_after = 100.0 * r.refused_after_drop as f64
        / (r.accepted - after as u64 + r.refused_after_drop) as f64;
    table.row(
        format!("a limit that drops from {limit}/s to {then}/s after {after} of {n} deliveries"),
        format!(
            "learned rate at or below {:.0}/s {followed} after the drop; after it: {after_rate:.1}/s = {:.0}% of the new limit, {} refused ({refused_after:.1}% of its requests); target: followed within seconds, ≤ 5% refused: {}",
            then as f64 * 1.1,
            100.0 * after_rate / then as f64,
            r.refused_after_drop,
            met_or_not(met && refused_after <= 5.0)
        ),
        &[after_rate, refused_after],
    );
}

fn met_or_not(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}
