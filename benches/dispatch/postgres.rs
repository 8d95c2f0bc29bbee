//! The PostgreSQL section (`--only postgres`): a server and a PgBouncer in
//! transaction pooling started here (tests/common/postgres.rs), and beside
//! each figure the SQLite one from the same run. Fork per delivery with one
//! and with two host processes (each its own dispatcher with its own slots),
//! children connecting directly and through PgBouncer; lease + record at
//! 10,000 and at the big backlog (`--only postgres-scale`); the latency of
//! a daemon woken by NOTIFY (`--only postgres-latency`).

use super::*;

/// Durability as SQLite's dispatcher connections have it (synchronous =
/// NORMAL: a commit is not waited on to reach the disk, the data is synced
/// at checkpoints): PostgreSQL's synchronous_commit = off, fsync on.
const SETTINGS: &str =
    "-c synchronous_commit=off -c max_connections=300 -c shared_buffers=256MB -c max_wal_size=4GB";

/// Children per host: the SQLite drain's best on this machine.
const CHILDREN: usize = 8;

struct Pg {
    cluster: postgres_server::Cluster,
    copies: std::cell::Cell<usize>,
}

impl Pg {
    /// A database `name` with `n` ready deliveries to endpoint e0, built once:
    /// bulk-inserted messages of about PAYLOAD_BYTES, routed by the library.
    fn ready_db(&self, bench: &Bench, name: &str, n: usize) {
        let exists = self.cluster.sql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
        );
        if exists == "1" {
            return;
        }
        self.cluster
            .sql("postgres", &format!("CREATE DATABASE {name}"));
        let config = Config::load(&self.config(bench, name, name, 1, false)).unwrap();
        let mut store = store::open(&config).unwrap();
        let pad = PAYLOAD_BYTES - 22;
        self.cluster.sql(
            name,
            &format!(
                "INSERT INTO messages (topic, account, payload, created_at)
                 SELECT 't', 'a' || (i % {ACCOUNTS}), json_build_object('n', i, 'pad', repeat('x', {pad}))::TEXT,
                        cronpost_now_ms()
                 FROM generate_series(1, {n}) AS i"
            ),
        );
        store
            .subscriptions_replace(&cronpost::routing::subscriptions(&config))
            .unwrap();
        cronpost::routing::route_all(store.as_mut(), store::now_ms(), &mut || {}).unwrap();
        drop(store);
        self.cluster.sql(name, "VACUUM ANALYZE");
    }

    /// A fresh copy of database `name`; returns its name. Each copy has a
    /// name of its own (PgBouncer keeps server connections to the last one
    /// for a while), and the one before is dropped.
    fn copy_of(&self, name: &str) -> String {
        let n = self.copies.get();
        self.copies.set(n + 1);
        if n > 0 {
            self.cluster.sql(
                "postgres",
                &format!("DROP DATABASE IF EXISTS copy{} WITH (FORCE)", n - 1),
            );
        }
        let copy = format!("copy{n}");
        self.cluster.sql(
            "postgres",
            &format!("CREATE DATABASE {copy} TEMPLATE {name}"),
        );
        copy
    }

    /// A config `file.toml` on database `db`, children through PgBouncer or
    /// directly, with its own slots.
    fn config(
        &self,
        bench: &Bench,
        file: &str,
        db: &str,
        children: usize,
        bouncer: bool,
    ) -> PathBuf {
        let path = bench.config(file, "unused.db", children, 1);
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            "database = \"unused.db\"",
            &format!(
                "database = \"{}\"\nlisten_database = \"{}\"\nslots_dir = \"{file}.slots\"",
                self.cluster.url(db, bouncer),
                self.cluster.url(db, false)
            ),
            1,
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Drains the database behind `configs` with one `cronpost run` per config,
/// all at once; deliveries a second.
fn drain_hosts(setup: &mut Setup, configs: &[PathBuf], n: usize) -> f64 {
    let before = setup.receiver.count();
    let started = Instant::now();
    let runs: Vec<Child> = configs
        .iter()
        .map(|config| {
            Command::new(BIN)
                .arg("run")
                .env("CRONPOST_CONFIG", config)
                .env("RUST_LOG", "warn")
                .spawn()
                .unwrap()
        })
        .collect();
    for mut run in runs {
        assert!(run.wait().unwrap().success());
    }
    let took = started.elapsed();
    assert_eq!((setup.receiver.count() - before) as usize, n);
    n as f64 / took.as_secs_f64()
}

/// Latency on PostgreSQL: a daemon (children through PgBouncer, its keeper
/// LISTENing directly), messages published one at a time by `cronpost
/// enqueue` and by a plain INSERT on a connection the producer keeps.
pub fn latency_section(options: &Options, table: &mut Table) {
    let pg = Pg {
        cluster: postgres_server::start(SETTINGS),
        copies: std::cell::Cell::new(0),
    };
    let rx = StampReceiver::start();
    let bench = Bench::new(&rx.url);
    let count = if options.quick { 40 } else { 200 };
    pg.cluster.sql("postgres", "CREATE DATABASE latency");
    let config = pg.config(&bench, "latency", "latency", 4, true);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("schedule = \"0 0 0 1 1 *\"\n{text}")).unwrap();
    let daemon = start_cronpost(&config, &["daemon"], "daemon started");
    let mut producer =
        ::postgres::Client::connect(&pg.cluster.url("latency", false), ::postgres::NoTls).unwrap();
    let mut insert = |uid: &str, account: &str, priority: i64| {
        producer
            .execute(
                "INSERT INTO messages (uid, topic, account, payload, priority) VALUES ($1, 't', $2, '{}', $3)",
                &[&uid, &account, &priority],
            )
            .unwrap();
    };
    for (how, name) in [
        (Publish::Cli, "cronpost enqueue"),
        (Publish::Sql, "plain SQL INSERT"),
    ] {
        let tag = format!("pg{}", name.len());
        let (ms, from_call) = publish_one_at_a_time(&config, &rx, how, &tag, count, 0, &mut insert);
        let (cell, xs) = percentiles(ms);
        let (call_cell, _) = percentiles(from_call);
        table.row(
            format!("PostgreSQL latency, daemon idle: {count} messages one at a time by {name}, publication (commit) to arrival"),
            format!("{cell} (from the start of the producer's call: {call_cell})"),
            &xs,
        );
    }
    stop(daemon);
}

pub fn section(setup: &mut Setup, table: &mut Table) {
    let pg = Pg {
        cluster: postgres_server::start(SETTINGS),
        copies: std::cell::Cell::new(0),
    };
    let n = setup.n;
    // SQLite beside it: the same drain, one host.
    let (rate, xs) = repeat(setup.options.repeats, || {
        let config = setup.bench.copy_of("pgside", n, CHILDREN);
        let before = setup.receiver.count();
        let report = cronpost_run(&config);
        assert_eq!((setup.receiver.count() - before) as usize, n);
        n as f64 / report.took.as_secs_f64()
    });
    table.row(
        format!("SQLite, fork per delivery: {n} deliveries, one host, max_children {CHILDREN}"),
        format!("{rate:.0} deliveries/s"),
        &xs,
    );
    pg.ready_db(&setup.bench, "drain", n);
    for bouncer in [false, true] {
        let via = if bouncer {
            "through PgBouncer"
        } else {
            "direct"
        };
        for hosts in [1, 2] {
            let (rate, xs) = repeat(setup.options.repeats, || {
                let copy = pg.copy_of("drain");
                let configs: Vec<PathBuf> = (0..hosts)
                    .map(|h| pg.config(&setup.bench, &format!("host{h}"), &copy, CHILDREN, bouncer))
                    .collect();
                drain_hosts(setup, &configs, n)
            });
            table.row(
                format!(
                    "PostgreSQL, fork per delivery: {n} deliveries, {hosts} host process{} of max_children {CHILDREN}, children {via}",
                    if hosts == 1 { "" } else { "es" }
                ),
                format!("{rate:.0} deliveries/s"),
                &xs,
            );
        }
    }
}

/// Lease + record at 10,000 and at the big backlog, beside SQLite's
/// (`--only postgres-scale`). Each reading leases from a fresh copy.
pub fn scale_section(setup: &mut Setup, table: &mut Table) {
    let pg = Pg {
        cluster: postgres_server::start(SETTINGS),
        copies: std::cell::Cell::new(0),
    };
    let ops = if setup.options.quick { 1_000 } else { 5_000 };
    for backlog in [10_000, setup.big] {
        let name = format!("backlog{backlog}");
        pg.ready_db(&setup.bench, &name, backlog);
        let rows: [(&str, bool, Option<bool>); 5] = [
            ("SQLite, a new connection per delivery", true, None),
            (
                "PostgreSQL, a new direct connection per delivery",
                true,
                Some(false),
            ),
            (
                "PostgreSQL, a new connection through PgBouncer per delivery",
                true,
                Some(true),
            ),
            ("SQLite, one connection", false, None),
            ("PostgreSQL, one direct connection", false, Some(false)),
        ];
        for (how, fresh, backend) in rows {
            let (rate, xs) = repeat(setup.options.repeats, || {
                let config = match backend {
                    None => setup.bench.copy_of(&format!("sqlite{backlog}"), backlog, 1),
                    Some(bouncer) => {
                        let copy = pg.copy_of(&name);
                        pg.config(&setup.bench, "scale", &copy, 1, bouncer)
                    }
                };
                lease_record_rate(&config, ops, fresh)
            });
            table.row(
                format!("lease + record (no HTTP), {how}, {backlog} ready deliveries"),
                format!("{rate:.0} deliveries/s"),
                &xs,
            );
        }
    }
}
