//! A real PostgreSQL server and a PgBouncer in transaction pooling, started
//! once per test binary in a temporary directory (unix sockets only, as the
//! `postgres` user when the tests run as root: the server refuses root),
//! and a fresh database per test. Both stop when the test binary exits: a
//! watchdog process reads a pipe only this process holds, and at its EOF
//! (this process is gone, however it ended) stops them by PID and removes
//! the directory.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Where Debian's PostgreSQL 15 server programs are.
const BIN: &str = "/usr/lib/postgresql/15/bin";

/// The running server and bouncer of this test binary.
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    bouncer_port: u16,
    /// Its stdin's EOF stops everything; kept open while this process lives.
    _watchdog: Mutex<(Child, ChildStdin)>,
}

/// One test's database, on the server and through the bouncer.
pub struct Database {
    pub name: String,
    /// Direct to the server (unix socket).
    pub url: String,
    /// Through PgBouncer in transaction pooling (unix socket).
    pub bouncer_url: String,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DATABASE: AtomicUsize = AtomicUsize::new(0);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A command run as the `postgres` user when this process is root.
fn as_server_user(program: &str) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", program]);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The server's and the bouncer's ports: they listen on unix sockets only,
/// in a directory of their own, where the port only names the socket file.
const PORT: u16 = 5432;
const BOUNCER_PORT: u16 = 6432;

/// Server settings for tests: no fsync at all (a test's data is thrown away).
pub const TEST_SETTINGS: &str =
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300";

/// The cluster of this test binary, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| start(TEST_SETTINGS))
}

/// Starts a server with `settings` (postgres command-line options) and a
/// PgBouncer in front of it.
pub fn start(settings: &str) -> Cluster {
    let dir = tempfile::Builder::new()
        .prefix("cronpost-pg-")
        .tempdir()
        .unwrap()
        .keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let data = dir.join("data");
    let (port, bouncer_port) = (PORT, BOUNCER_PORT);
    // The watchdog first, so that whatever fails below leaves nothing
    // running: at this process's end it stops what was started (by the
    // PIDs in their pidfiles; SIGKILL after 30 s) and removes the directory.
    // $1: the directory, $2: the data directory. The terminal's Ctrl-C is
    // for the tests: the watchdog ignores it and still cleans up.
    let script = "trap '' INT HUP TERM; cat >/dev/null; \
         kill -TERM $(cat \"$1/pgbouncer.pid\" 2>/dev/null) 2>/dev/null; \
         kill -QUIT $(head -1 \"$2/postmaster.pid\" 2>/dev/null) 2>/dev/null; \
         for i in $(seq 300); do \
           kill -0 $(cat \"$1/pgbouncer.pid\" 2>/dev/null) 2>/dev/null || \
           kill -0 $(head -1 \"$2/postmaster.pid\" 2>/dev/null) 2>/dev/null || break; sleep 0.1; done; \
         kill -KILL $(cat \"$1/pgbouncer.pid\" 2>/dev/null) $(head -1 \"$2/postmaster.pid\" 2>/dev/null) 2>/dev/null; \
         rm -rf \"$1\"";
    let mut watchdog = Command::new("sh")
        .args(["-c", script, "watchdog"])
        .arg(&dir)
        .arg(&data)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = watchdog.stdin.take().unwrap();
    let watchdog = Mutex::new((watchdog, stdin));

    let mut initdb = as_server_user(&format!("{BIN}/initdb"));
    initdb.args([
        "-D",
        data.to_str().unwrap(),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
        // An ICU locale whose order is not the bytes' ("a" before "B"), so a
        // query that forgets the schema's byte order is caught; it needs no
        // system locale on the machine.
        "--locale=C.UTF-8",
        "--locale-provider=icu",
        "--icu-locale=en-US",
    ]);
    run(initdb, "initdb");
    let mut pg_ctl = as_server_user(&format!("{BIN}/pg_ctl"));
    pg_ctl.args([
        "-D",
        data.to_str().unwrap(),
        "-l",
        dir.join("postgres.log").to_str().unwrap(),
        "-w",
        "-o",
        &format!(
            "-k {} -p {port} -c listen_addresses='' {settings}",
            dir.display()
        ),
        "start",
    ]);
    run(pg_ctl, "pg_ctl start");

    let ini = dir.join("pgbouncer.ini");
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
    std::fs::write(
        &ini,
        format!(
            "[databases]\n* = host={dir} port={port}\n\n[pgbouncer]\nlisten_addr =\nlisten_port = {bouncer_port}\n\
             unix_socket_dir = {dir}\npool_mode = transaction\nauth_type = trust\nauth_file = {dir}/users.txt\n\
             max_client_conn = 1000\ndefault_pool_size = 20\nlogfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let mut bouncer = as_server_user("pgbouncer");
    bouncer.args(["-d", ini.to_str().unwrap()]);
    run(bouncer, "pgbouncer");

    let cluster = Cluster {
        dir,
        port,
        bouncer_port,
        _watchdog: watchdog,
    };
    cluster.wait_for_bouncer();
    cluster
}

impl Cluster {
    /// The socket directory, percent-encoded for a URL's host.
    fn host(&self) -> String {
        self.dir.to_str().unwrap().replace('/', "%2F")
    }

    /// A URL of database `name`, direct or through the bouncer.
    pub fn url(&self, name: &str, through_bouncer: bool) -> String {
        let port = if through_bouncer {
            self.bouncer_port
        } else {
            self.port
        };
        format!("postgres://postgres@{}:{port}/{name}", self.host())
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// psql on database `name` (direct), with `args` after the connection.
    pub fn psql(&self, name: &str) -> Command {
        let mut command = Command::new("psql");
        command.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            self.dir.to_str().unwrap(),
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            name,
        ]);
        command
    }

    /// Runs `sql` on database `name`; its output, unaligned without headers.
    pub fn sql(&self, name: &str, sql: &str) -> String {
        let out = self
            .psql(name)
            .args(["-A", "-t", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql -c {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// The bouncer takes connections once it has made its socket; the
    /// daemonized start returns before that.
    fn wait_for_bouncer(&self) {
        let socket = self.dir.join(format!(".s.PGSQL.{}", self.bouncer_port));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "pgbouncer made no socket in 30 s: {}",
                std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A new, empty database for one test.
    pub fn database(&self) -> Database {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::SeqCst)
        );
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        Database {
            url: self.url(&name, false),
            bouncer_url: self.url(&name, true),
            name,
        }
    }
}

/// A new, empty database on this test binary's cluster.
pub fn database() -> Database {
    cluster().database()
}

impl Database {
    /// Runs `sql` on it; the output, unaligned without headers.
    pub fn sql(&self, sql: &str) -> String {
        cluster().sql(&self.name, sql)
    }

    /// Runs `sql` on it; rows one per line, values separated by 0x1f.
    pub fn sql_separated(&self, sql: &str) -> String {
        let out = cluster()
            .psql(&self.name)
            .args(["-A", "-t", "-F", "\x1f", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql -c {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end_matches('\n')
            .to_string()
    }

    /// The number `sql` selects.
    pub fn query_i64(&self, sql: &str) -> i64 {
        let out = self.sql(sql);
        out.parse()
            .unwrap_or_else(|_| panic!("{sql:?} gave {out:?}, not a number"))
    }
}
