//! The TOML configuration: parsed once, validated whole, and turned into plain
//! typed values. Every rejection names the key and its line in the file, so an
//! admin can fix it without guessing; nothing downstream re-checks it.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, ExitCode, Result};
use crate::saturation::{EndpointLimits, LeasePolicy, Rate};

/// Where the config is read from when neither `--config` nor `CRONPOST_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/cronpost/cronpost.toml";

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// Where the queue lives: a SQLite file or a PostgreSQL database.
    pub database: Database,
    /// Where a run's keeper LISTENs for new messages on PostgreSQL (a
    /// session's state: a direct connection when `database` goes through
    /// PgBouncer in transaction pooling); None: `database`.
    pub listen_database: Option<String>,
    /// This host's name in run records and lease owners (`host_name`, by
    /// default the machine's): which host of a shared queue did what.
    pub host_name: String,
    /// Where the slot files of the global child limit live (local disk: the
    /// limit is per host, also when hosts share a PostgreSQL queue).
    pub slots_dir: PathBuf,
    /// How long a statement waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// The group a new database file is given (mode 0660 instead of 0600).
    pub database_group: Option<u32>,
    /// The largest payload `enqueue` accepts, in bytes.
    pub max_payload_bytes: usize,
    /// Whether payloads must be JSON objects (not arrays, strings, numbers).
    pub require_object_payload: bool,
    /// Limits of one dispatcher run.
    pub run: RunLimits,
    /// Per-account rate limits (`[account_budget]`).
    pub account_budget: AccountBudget,
    /// When `cronpost daemon` starts a run (cron with seconds), and its text.
    pub schedule: Option<(cron::Schedule, String)>,
    /// Where the Prometheus text file goes after each run.
    pub metrics_file: Option<PathBuf>,
    /// How long delivered deliveries (and their attempts) are kept.
    pub retention: Duration,
    /// How long dead letters (and their attempts) are kept.
    pub dead_retention: Duration,
    /// The endpoints, sorted by name.
    pub endpoints: Vec<Endpoint>,
    /// Settings of topics (`[topics.NAME]`), by name; a topic not listed
    /// has the defaults.
    pub topics: BTreeMap<String, TopicSettings>,
    /// Settings that are allowed but probably wrong, one line each.
    pub warnings: Vec<String>,
}

/// A topic's settings (`[topics.NAME]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicSettings {
    /// A message of the topic published without a time to live of its own
    /// expires this long after it was published (None: never).
    pub max_age: Option<Duration>,
    /// An expired delivery of the topic is dropped (counted) instead of
    /// kept as a dead letter.
    pub discard_expired: bool,
}

/// Where the queue lives (`database`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file (relative paths are relative to the config file).
    Sqlite(PathBuf),
    /// A PostgreSQL database, by its connection URL (`postgres://` or
    /// `postgresql://`), shared by the dispatchers of several hosts.
    Postgres(String),
}

impl Config {
    /// The URL a PostgreSQL keeper LISTENs on: `listen_database`, else
    /// `database` (empty for SQLite).
    pub fn listen_url(&self) -> &str {
        match (&self.listen_database, &self.database) {
            (Some(url), _) => url,
            (None, Database::Postgres(url)) => url,
            (None, Database::Sqlite(_)) => "",
        }
    }
}

impl Database {
    /// The SQLite file, if the queue is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Database::Sqlite(path) => Some(path),
            Database::Postgres(_) => None,
        }
    }

    /// Whether `text` names a PostgreSQL database rather than a file.
    fn is_postgres_url(text: &str) -> bool {
        ["postgres://", "postgresql://"]
            .iter()
            .any(|scheme| text.starts_with(scheme))
    }
}

/// The database as messages name it: the file, or the URL without its
/// password.
impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres(url) => f.write_str(&redacted_database_url(url)),
        }
    }
}

/// The machine's host name, up to its first dot, in the characters a
/// `host_name` may have ("localhost" if it has none).
fn machine_name() -> String {
    let name: String = nix::unistd::gethostname()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_".contains(*c))
        .take(64)
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// A PostgreSQL URL as messages show it: a password, in the user part or
/// as a `password=` parameter, replaced by `***`.
pub fn redacted_database_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        // Not a URL the url crate reads (several hosts: h1:5432,h2:5432):
        // by hand, the user part and any password= parameter.
        let mut shown = url.to_string();
        if let Some(start) = shown.find("://").map(|i| i + 3)
            && let Some(at) = shown[start..].find('@').map(|i| start + i)
            && let Some(colon) = shown[start..at].find(':').map(|i| start + i)
        {
            shown.replace_range(colon + 1..at, "***");
        }
        if let Some(i) = shown.find("password=") {
            let end = shown[i..].find('&').map_or(shown.len(), |j| i + j);
            shown.replace_range(i + "password=".len()..end, "***");
        }
        return shown;
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Where the slots of a PostgreSQL queue live unless `slots_dir` says.
pub const DEFAULT_POSTGRES_SLOTS_DIR: &str = "/run/cronpost";

/// Limits of one dispatcher run (`[run]`).
#[derive(Clone, Debug)]
pub struct RunLimits {
    /// Children alive at once.
    pub max_children: usize,
    /// Children forked in one run at most (each delivers at most one message).
    pub max_messages: u64,
    /// After this, the run forks no more children and waits for those alive.
    pub max_runtime: Duration,
    /// How long a lease hides a delivery from other children (visibility timeout).
    pub lease_timeout: Duration,
    /// A child alive longer than this is killed with SIGKILL.
    pub child_deadline: Duration,
    /// The share of children that take eligible delayed deliveries first,
    /// so a continuous ready backlog never starves the delayed queue.
    pub delayed_share: f64,
    /// After SIGTERM/SIGINT, how long children in flight may finish.
    pub stop_grace: Duration,
}

/// Per-account budgets: a default rate and per-account overrides.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AccountBudget {
    /// The rate of every account without an override (None: unlimited).
    pub default: Option<Rate>,
    /// Rates of named accounts.
    pub overrides: BTreeMap<String, Rate>,
}

/// How a child decides that a POST was handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// Delivered once the request is written; an answer is awaited only for
    /// `answer_window` (no answer in that window also counts as delivered).
    FireAndForget,
    /// Delivered only on a 2xx received within `timeout`.
    Confirm,
}

/// An endpoint's HMAC key. Its Debug form never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Reads a secret as Standard Webhooks writes it: `whsec_<base64 key>`, or
    /// else the raw bytes of the string are the key.
    pub fn parse(text: &str) -> std::result::Result<Secret, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        // Standard Webhooks libraries write the key with or without padding.
        const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        match text.strip_prefix("whsec_") {
            Some("") => Err("whsec_ secret has an empty key".into()),
            Some(b64) => BASE64
                .decode(b64)
                .map(Secret)
                .map_err(|e| format!("whsec_ secret is not valid base64 ({e})")),
            None => Ok(Secret(text.as_bytes().to_vec())),
        }
    }

    /// The key bytes.
    pub fn key(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// One webhook endpoint (`[endpoints.NAME]`).
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Its name, the key of its table.
    pub name: String,
    /// Where deliveries are POSTed (http or https).
    pub url: EndpointUrl,
    /// The topics it subscribes to.
    pub topics: Vec<String>,
    /// The HMAC-SHA256 keys for `webhook-signature`: one `v1,` signature
    /// per key, so a receiver can rotate (the first is the newest).
    pub secrets: Vec<Secret>,
    /// Fire-and-forget or confirm.
    pub mode: DeliveryMode,
    /// Fire-and-forget: how long to wait for an early answer.
    pub answer_window: Duration,
    /// Confirm: how long to wait for the answer.
    pub timeout: Duration,
    /// How long to wait for the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Attempts before a delivery goes dead.
    pub max_attempts: u32,
    /// First retry delay before jitter; doubles on each attempt.
    pub backoff_base: Duration,
    /// Largest retry delay.
    pub backoff_cap: Duration,
    /// Children posting to it at once, across all runs (None: no cap).
    pub max_in_flight: Option<u32>,
    /// Its rate limit (None: unlimited).
    pub rate: Option<Rate>,
    /// Cool-down after the first saturation signal; doubles per repeat.
    pub cooldown_base: Duration,
    /// Longest cool-down without a Retry-After.
    pub cooldown_cap: Duration,
    /// Longest Retry-After honoured.
    pub max_retry_after: Duration,
    /// Fire-and-forget answers missing in a row that open the breaker
    /// (None: off).
    pub slow_after: Option<u32>,
    /// What a dead delivery does to its ordering key.
    pub on_dead: OnDead,
    /// Whether its rate is learned from its answers (`adaptive`, default
    /// on): see `adaptive`.
    pub adaptive: bool,
}

/// What a dead delivery with an ordering key does to the later ones of
/// its key (`on_dead`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDead {
    /// The next one goes (the default): one bad message does not stop its key.
    #[default]
    Release,
    /// The later ones wait until the dead one is requeued (and delivered)
    /// or removed.
    Block,
}

/// An endpoint's URL. Its Debug form is redacted: a URL may hold a password
/// or a token.
#[derive(Clone, PartialEq, Eq)]
pub struct EndpointUrl(pub url::Url);

impl std::ops::Deref for EndpointUrl {
    type Target = url::Url;
    fn deref(&self) -> &url::Url {
        &self.0
    }
}

impl fmt::Debug for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redacted(&self.0))
    }
}

/// `url` as it may be printed or logged: credentials (`user:pass@`) and
/// query values (`?token=...`) replaced by `***`.
pub fn redacted(url: &url::Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        let _ = shown.set_username("***");
        let _ = shown.set_password(None);
    }
    if shown.query().is_some() {
        let pairs: Vec<String> = url
            .query_pairs()
            .map(|(name, _)| format!("{name}=***"))
            .collect();
        shown.set_query(Some(&pairs.join("&")));
    }
    shown.to_string()
}

/// URL text that did not parse, as it may be printed: whatever sits
/// between "://" and an "@", and after a "?", replaced by `***`.
fn redacted_text(text: &str) -> String {
    let mut shown = text.to_string();
    if let Some(query) = shown.find('?') {
        shown.replace_range(query + 1.., "***");
    }
    if let (Some(start), Some(at)) = (shown.find("://"), shown.rfind('@'))
        && at > start + 3
    {
        shown.replace_range(start + 3..at, "***");
    }
    shown
}

impl DeliveryMode {
    /// Its name in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::FireAndForget => "fire_and_forget",
            DeliveryMode::Confirm => "confirm",
        }
    }
}

impl Endpoint {
    /// The endpoint's limits as the store applies them.
    pub fn limits(&self) -> EndpointLimits {
        EndpointLimits {
            max_in_flight: self.max_in_flight,
            rate: self.rate,
            cooldown_base: self.cooldown_base,
            cooldown_cap: self.cooldown_cap,
            max_retry_after: self.max_retry_after,
            slow_after: self.slow_after,
            adaptive: self.adaptive,
        }
    }

    /// How long a child may wait on this endpoint after connecting.
    pub fn answer_wait(&self) -> Duration {
        match self.mode {
            DeliveryMode::FireAndForget => self.answer_window,
            DeliveryMode::Confirm => self.timeout,
        }
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("config {}", path.display()), e))
            .map_err(|e| Error::new(ExitCode::Config, e.message))?;
        let mut config = Config::parse(&text, path)?;
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o004 != 0 {
                config.warnings.push(format!(
                    "config {} is world-readable (mode {mode:04o}) and holds endpoint secrets: chmod 0600 (or 0640 for a group)",
                    path.display()
                ));
            }
        }
        for warning in &config.warnings {
            log::warn!("{warning}");
        }
        Ok(config)
    }

    /// Validates config text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let at = Locator { text, path };
        let syntax = |e: toml::de::Error| {
            let line = e.span().map(|s| at.line(s.start)).unwrap_or(1);
            at.error_at_line(line, e.message().trim())
        };
        let document = toml::Deserializer::parse(text).map_err(syntax)?;
        let raw: RawConfig = serde_path_to_error::deserialize(document).map_err(|e| {
            // The dotted key, as the other errors name it (serde_path_to_error
            // tracks it; the spans' private fields are not keys).
            let key = e
                .path()
                .iter()
                .map(|segment| segment.to_string())
                .filter(|segment| !segment.starts_with("$__") && segment != "?")
                .collect::<Vec<_>>()
                .join(".");
            let inner = e.into_inner();
            let line = inner.span().map(|s| at.line(s.start)).unwrap_or(1);
            let message = inner.message().trim().to_string();
            if key.is_empty() || message.contains(&key) {
                at.error_at_line(line, message)
            } else {
                at.error_at_line(line, format!("{key}: {message}"))
            }
        })?;
        raw.validate(&at)
    }

    /// The endpoint named `name`.
    pub fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.name == name)
    }
}

impl LeasePolicy for Config {
    fn account_rate(&self, account: &str) -> Option<Rate> {
        self.account_budget
            .overrides
            .get(account)
            .copied()
            .or(self.account_budget.default)
    }

    fn endpoint_limits(&self, endpoint: &str) -> Option<EndpointLimits> {
        self.endpoint(endpoint).map(Endpoint::limits)
    }

    fn endpoints_with_in_flight_caps(&self) -> Vec<(String, u32)> {
        self.endpoints
            .iter()
            .filter_map(|e| e.max_in_flight.map(|cap| (e.name.clone(), cap)))
            .collect()
    }

    fn endpoint_known(&self, endpoint: &str) -> bool {
        self.endpoint(endpoint).is_some()
    }
}

/// Turns byte offsets into "config FILE line N: ..." errors.
struct Locator<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Locator<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn error_at_line(&self, line: usize, message: impl fmt::Display) -> Error {
        Error::config(format!(
            "config {} line {line}: {message}",
            self.path.display()
        ))
    }

    fn error(&self, span: Range<usize>, key: &str, message: impl fmt::Display) -> Error {
        self.error_at_line(self.line(span.start), format!("{key} {message}"))
    }

    fn duration(&self, value: &Spanned<String>, key: &str) -> Result<Duration> {
        humantime::parse_duration(value.get_ref()).map_err(|e| {
            self.error(
                value.span(),
                key,
                format!(
                    "= {:?} is not a duration like \"30s\" or \"500ms\" ({e})",
                    value.get_ref()
                ),
            )
        })
    }

    fn duration_or(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration> {
        value
            .as_ref()
            .map_or(Ok(default), |v| self.duration(v, key))
    }

    /// A rate (`KEY.rate`, `KEY.burst`); burst defaults to the rate rounded up.
    fn rate(
        &self,
        rate: &Option<Spanned<f64>>,
        burst: &Option<Spanned<i64>>,
        prefix: &str,
    ) -> Result<Option<Rate>> {
        let Some(rate) = rate else {
            return match burst {
                Some(b) => Err(self.error(
                    b.span(),
                    &format!("{prefix}burst"),
                    format!("needs a {prefix}rate"),
                )),
                None => Ok(None),
            };
        };
        let per_second = *rate.get_ref();
        if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1e6) {
            return Err(self.error(
                rate.span(),
                &format!("{prefix}rate"),
                format!("= {per_second} must be a number of deliveries per second above 0"),
            ));
        }
        let default_burst = per_second.ceil() as i64;
        let burst =
            self.positive(burst, &format!("{prefix}burst"), default_burst, 1_000_000)? as u32;
        Ok(Some(Rate { per_second, burst }))
    }

    fn positive(
        &self,
        value: &Option<Spanned<i64>>,
        key: &str,
        default: i64,
        max: i64,
    ) -> Result<i64> {
        match value {
            None => Ok(default),
            Some(v) if (1..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err(self.error(
                v.span(),
                key,
                format!("= {} must be between 1 and {max}", v.get_ref()),
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: Spanned<String>,
    database_group: Option<Spanned<String>>,
    slots_dir: Option<Spanned<String>>,
    listen_database: Option<Spanned<String>>,
    host_name: Option<Spanned<String>>,
    busy_timeout: Option<Spanned<String>>,
    max_payload_bytes: Option<Spanned<i64>>,
    #[serde(default)]
    require_object_payload: bool,
    #[serde(default)]
    run: RawRun,
    #[serde(default)]
    account_budget: RawBudget,
    schedule: Option<Spanned<String>>,
    metrics_file: Option<Spanned<String>>,
    retention: Option<Spanned<String>>,
    dead_retention: Option<Spanned<String>>,
    endpoints: Option<Spanned<BTreeMap<String, Spanned<RawEndpoint>>>>,
    #[serde(default)]
    topics: BTreeMap<String, Spanned<RawTopic>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    max_age: Option<Spanned<String>>,
    #[serde(default)]
    discard_expired: bool,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    max_children: Option<Spanned<i64>>,
    max_messages: Option<Spanned<i64>>,
    max_runtime: Option<Spanned<String>>,
    lease_timeout: Option<Spanned<String>>,
    child_deadline: Option<Spanned<String>>,
    delayed_share: Option<Spanned<f64>>,
    stop_grace: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    rate: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
    #[serde(default)]
    overrides: BTreeMap<String, RawRate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    rate: Spanned<f64>,
    burst: Option<Spanned<i64>>,
}

/// `secret = "..."` or, while rotating, `secret = ["new", "old"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Secrets {
    One(String),
    Several(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    url: Spanned<String>,
    topics: Spanned<Vec<Spanned<String>>>,
    secret: Spanned<Secrets>,
    mode: Option<DeliveryMode>,
    answer_window: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    max_attempts: Option<Spanned<i64>>,
    backoff_base: Option<Spanned<String>>,
    backoff_cap: Option<Spanned<String>>,
    max_in_flight: Option<Spanned<i64>>,
    rate: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
    cooldown_base: Option<Spanned<String>>,
    cooldown_cap: Option<Spanned<String>>,
    max_retry_after: Option<Spanned<String>>,
    slow_after: Option<Spanned<i64>>,
    on_dead: Option<OnDead>,
    adaptive: Option<bool>,
}

impl RawConfig {
    fn validate(self, at: &Locator) -> Result<Config> {
        if self.database.get_ref().trim().is_empty() {
            return Err(at.error(self.database.span(), "database", "must not be empty"));
        }
        let base = at.path.parent().unwrap_or(Path::new("."));
        let text = self.database.get_ref().trim();
        let database = if Database::is_postgres_url(text) {
            if let Err(e) = text.parse::<postgres::Config>() {
                return Err(at.error(
                    self.database.span(),
                    "database",
                    format!("is not a PostgreSQL connection URL: {e}"),
                ));
            }
            Database::Postgres(text.to_string())
        } else {
            Database::Sqlite(base.join(self.database.get_ref()))
        };
        let listen_database = match (&self.listen_database, &database) {
            (None, _) => None,
            (Some(url), Database::Postgres(_)) if Database::is_postgres_url(url.get_ref()) => {
                if let Err(e) = url.get_ref().parse::<postgres::Config>() {
                    return Err(at.error(
                        url.span(),
                        "listen_database",
                        format!("is not a PostgreSQL connection URL: {e}"),
                    ));
                }
                Some(url.get_ref().clone())
            }
            (Some(url), Database::Postgres(_)) => {
                return Err(at.error(
                    url.span(),
                    "listen_database",
                    "must be a postgres:// or postgresql:// URL",
                ));
            }
            (Some(url), Database::Sqlite(_)) => {
                return Err(at.error(
                    url.span(),
                    "listen_database",
                    "is for a PostgreSQL database; this database is a SQLite file",
                ));
            }
        };
        let host_name = match &self.host_name {
            Some(name)
                if name.get_ref().is_empty()
                    || name.get_ref().len() > 64
                    || !name
                        .get_ref()
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
            {
                return Err(at.error(
                    name.span(),
                    "host_name",
                    format!(
                        "= {:?} must be 1 to 64 of A-Z a-z 0-9 - _ .",
                        name.get_ref()
                    ),
                ));
            }
            Some(name) => name.get_ref().clone(),
            None => machine_name(),
        };
        let slots_dir = match (&self.slots_dir, &database) {
            (Some(dir), _) if dir.get_ref().trim().is_empty() => {
                return Err(at.error(dir.span(), "slots_dir", "must not be empty"));
            }
            (Some(dir), _) => base.join(dir.get_ref()),
            (None, Database::Sqlite(path)) => crate::files::with_suffix(path, ".slots"),
            (None, Database::Postgres(_)) => PathBuf::from(DEFAULT_POSTGRES_SLOTS_DIR),
        };
        let database_group = match &self.database_group {
            None => None,
            Some(name) => match nix::unistd::Group::from_name(name.get_ref()) {
                Ok(Some(group)) => Some(group.gid.as_raw()),
                Ok(None) => {
                    return Err(at.error(
                        name.span(),
                        "database_group",
                        format!("= {:?}: no such group", name.get_ref()),
                    ));
                }
                Err(e) => {
                    return Err(at.error(
                        name.span(),
                        "database_group",
                        format!("cannot be looked up: {e}"),
                    ));
                }
            },
        };
        let busy_timeout =
            at.duration_or(&self.busy_timeout, "busy_timeout", Duration::from_secs(5))?;
        let max_payload_bytes = at.positive(
            &self.max_payload_bytes,
            "max_payload_bytes",
            256 * 1024,
            64 << 20,
        )? as usize;
        let run = self.run.validate(at, busy_timeout)?;
        let schedule = match self.schedule {
            None => None,
            Some(text) => {
                let parsed = text.get_ref().parse::<cron::Schedule>().map_err(|e| {
                    at.error(
                        text.span(),
                        "schedule",
                        format!(
                            "= {:?} is not a cron expression with seconds (6 or 7 fields, seconds first), like \"*/5 * * * * *\" ({})",
                            text.get_ref(),
                            // The parser's message can span lines (a caret
                            // under the input): its first line says it.
                            e.to_string().lines().next().unwrap_or_default().trim()
                        ),
                    )
                })?;
                Some((parsed, text.into_inner()))
            }
        };
        let metrics_file = match self.metrics_file {
            Some(path) if path.get_ref().trim().is_empty() => {
                return Err(at.error(path.span(), "metrics_file", "must not be empty"));
            }
            Some(path) => Some(base.join(path.get_ref())),
            None => None,
        };
        let mut account_budget = AccountBudget {
            default: at.rate(
                &self.account_budget.rate,
                &self.account_budget.burst,
                "account_budget.",
            )?,
            overrides: BTreeMap::new(),
        };
        for (account, raw) in self.account_budget.overrides {
            let prefix = format!("account_budget.overrides.{account}.");
            let rate = at
                .rate(&Some(raw.rate), &raw.burst, &prefix)?
                .expect("a rate was given");
            account_budget.overrides.insert(account, rate);
        }
        let Some(endpoints) = self.endpoints else {
            return Err(at.error_at_line(1, "[endpoints] must define at least one endpoint"));
        };
        if endpoints.get_ref().is_empty() {
            return Err(at.error(
                endpoints.span(),
                "endpoints",
                "must define at least one endpoint",
            ));
        }
        let mut warnings = Vec::new();
        let endpoints = endpoints
            .into_inner()
            .into_iter()
            .map(|(name, raw)| raw.into_inner().validate(at, name, &run, &mut warnings))
            .collect::<Result<Vec<_>>>()?;
        let mut topics = BTreeMap::new();
        for (name, raw) in self.topics {
            let key = format!("topics.{name}");
            if !endpoints.iter().any(|e| e.topics.contains(&name)) {
                return Err(at.error(
                    raw.span(),
                    &key,
                    "names a topic no endpoint subscribes to (a typo?)",
                ));
            }
            let raw = raw.into_inner();
            let max_age = match &raw.max_age {
                None => None,
                Some(text) => match at.duration(text, &format!("{key}.max_age"))? {
                    age if age.is_zero() => {
                        return Err(at.error(
                            text.span(),
                            &format!("{key}.max_age"),
                            "must be longer than 0s",
                        ));
                    }
                    age => Some(age),
                },
            };
            topics.insert(
                name,
                TopicSettings {
                    max_age,
                    discard_expired: raw.discard_expired,
                },
            );
        }
        Ok(Config {
            path: at.path.to_path_buf(),
            database,
            listen_database,
            host_name,
            slots_dir,
            database_group,
            busy_timeout,
            max_payload_bytes,
            require_object_payload: self.require_object_payload,
            run,
            account_budget,
            schedule,
            metrics_file,
            retention: at.duration_or(
                &self.retention,
                "retention",
                Duration::from_secs(7 * 24 * 3600),
            )?,
            dead_retention: at.duration_or(
                &self.dead_retention,
                "dead_retention",
                Duration::from_secs(30 * 24 * 3600),
            )?,
            endpoints,
            topics,
            warnings,
        })
    }
}

impl RawRun {
    fn validate(self, at: &Locator, busy_timeout: Duration) -> Result<RunLimits> {
        let max_children = at.positive(&self.max_children, "run.max_children", 4, 1024)? as usize;
        let max_messages =
            at.positive(&self.max_messages, "run.max_messages", 10_000, i64::MAX)? as u64;
        let max_runtime = at.duration_or(
            &self.max_runtime,
            "run.max_runtime",
            Duration::from_secs(50),
        )?;
        let lease_timeout = at.duration_or(
            &self.lease_timeout,
            "run.lease_timeout",
            Duration::from_secs(60),
        )?;
        let child_deadline = at.duration_or(
            &self.child_deadline,
            "run.child_deadline",
            Duration::from_secs(30),
        )?;
        let delayed_share = match &self.delayed_share {
            None => 0.2,
            Some(v) if (0.0..=1.0).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                return Err(at.error(
                    v.span(),
                    "run.delayed_share",
                    format!("= {} must be between 0 and 1", v.get_ref()),
                ));
            }
        };
        if lease_timeout <= child_deadline + busy_timeout {
            // A lease that can expire while its child may still be alive lets a
            // second child deliver the same message while the first still posts;
            // a child may wait busy_timeout for the lock to lease, before its
            // deadline starts to matter.
            let (lease, deadline, busy) = (
                humantime::format_duration(lease_timeout),
                humantime::format_duration(child_deadline),
                humantime::format_duration(busy_timeout),
            );
            return Err(match (&self.lease_timeout, &self.child_deadline) {
                (Some(v), _) => at.error(
                    v.span(),
                    "run.lease_timeout",
                    format!(
                        "({lease}) must be longer than run.child_deadline ({deadline}) plus busy_timeout ({busy})"
                    ),
                ),
                (None, Some(v)) => at.error(
                    v.span(),
                    "run.child_deadline",
                    format!(
                        "({deadline}) plus busy_timeout ({busy}) must be shorter than run.lease_timeout ({lease})"
                    ),
                ),
                (None, None) => at.error_at_line(
                    1,
                    format!(
                        "busy_timeout ({busy}) is too long for the default run.lease_timeout ({lease}) and run.child_deadline ({deadline})"
                    ),
                ),
            });
        }
        Ok(RunLimits {
            max_children,
            max_messages,
            max_runtime,
            lease_timeout,
            child_deadline,
            delayed_share,
            stop_grace: at.duration_or(
                &self.stop_grace,
                "run.stop_grace",
                Duration::from_secs(10),
            )?,
        })
    }
}

impl RawEndpoint {
    fn validate(
        self,
        at: &Locator,
        name: String,
        run: &RunLimits,
        warnings: &mut Vec<String>,
    ) -> Result<Endpoint> {
        let prefix = format!("endpoints.{name}");
        let key = |field: &str| format!("{prefix}.{field}");
        let url = url::Url::parse(self.url.get_ref())
            .map_err(|e| e.to_string())
            .and_then(|u| match (u.scheme(), u.host_str()) {
                ("http" | "https", Some(_)) => Ok(u),
                (scheme, _) => Err(format!(
                    "needs an http:// or https:// URL with a host, not {scheme}:"
                )),
            })
            .map_err(|e| {
                at.error(
                    self.url.span(),
                    &key("url"),
                    format!(
                        "= {:?} is not a valid URL: {e}",
                        redacted_text(self.url.get_ref())
                    ),
                )
            })?;
        if self.topics.get_ref().is_empty() {
            return Err(at.error(
                self.topics.span(),
                &key("topics"),
                "must list at least one topic",
            ));
        }
        let mut topics = Vec::new();
        for topic in self.topics.into_inner() {
            if topic.get_ref().trim().is_empty() {
                return Err(at.error(topic.span(), &key("topics"), "has an empty topic"));
            }
            topics.push(topic.into_inner());
        }
        let texts = match self.secret.get_ref() {
            Secrets::One(text) => vec![text.as_str()],
            Secrets::Several(texts) => texts.iter().map(String::as_str).collect(),
        };
        if texts.is_empty() {
            return Err(at.error(
                self.secret.span(),
                &key("secret"),
                "must list at least one secret",
            ));
        }
        let secrets = texts
            .into_iter()
            .map(Secret::parse)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| at.error(self.secret.span(), &key("secret"), e))?;
        let endpoint = Endpoint {
            url: EndpointUrl(url),
            topics,
            secrets,
            mode: self.mode.unwrap_or(DeliveryMode::FireAndForget),
            answer_window: at.duration_or(
                &self.answer_window,
                &key("answer_window"),
                Duration::from_millis(200),
            )?,
            timeout: at.duration_or(&self.timeout, &key("timeout"), Duration::from_secs(10))?,
            connect_timeout: at.duration_or(
                &self.connect_timeout,
                &key("connect_timeout"),
                Duration::from_secs(2),
            )?,
            max_attempts: at.positive(&self.max_attempts, &key("max_attempts"), 8, 1000)? as u32,
            backoff_base: at.duration_or(
                &self.backoff_base,
                &key("backoff_base"),
                Duration::from_secs(1),
            )?,
            backoff_cap: at.duration_or(
                &self.backoff_cap,
                &key("backoff_cap"),
                Duration::from_secs(3600),
            )?,
            max_in_flight: match &self.max_in_flight {
                None => None,
                Some(_) => {
                    Some(at.positive(&self.max_in_flight, &key("max_in_flight"), 1, 10_000)? as u32)
                }
            },
            rate: at.rate(&self.rate, &self.burst, &format!("{prefix}."))?,
            cooldown_base: at.duration_or(
                &self.cooldown_base,
                &key("cooldown_base"),
                Duration::from_secs(1),
            )?,
            cooldown_cap: at.duration_or(
                &self.cooldown_cap,
                &key("cooldown_cap"),
                Duration::from_secs(300),
            )?,
            max_retry_after: at.duration_or(
                &self.max_retry_after,
                &key("max_retry_after"),
                Duration::from_secs(3600),
            )?,
            slow_after: match &self.slow_after {
                None => None,
                Some(_) => {
                    Some(at.positive(&self.slow_after, &key("slow_after"), 1, 1_000)? as u32)
                }
            },
            on_dead: self.on_dead.unwrap_or_default(),
            adaptive: self.adaptive.unwrap_or(true),
            name,
        };
        if let (Some(slow_after), DeliveryMode::Confirm) = (&self.slow_after, endpoint.mode) {
            return Err(at.error(
                slow_after.span(),
                &key("slow_after"),
                "applies to mode = \"fire_and_forget\" only: in confirm mode an answer that does not come within timeout is already a saturation signal",
            ));
        }
        if endpoint.connect_timeout + endpoint.answer_wait() >= run.child_deadline {
            // Allowed (the deadline is the hard bound), but every slow answer
            // then costs a killed child instead of a clean timeout.
            let (field, value) = match endpoint.mode {
                DeliveryMode::FireAndForget => ("answer_window", &self.answer_window),
                DeliveryMode::Confirm => ("timeout", &self.timeout),
            };
            let line = at.line(value.as_ref().map_or(0, |v| v.span().start));
            warnings.push(format!(
                "config {} line {line}: {} plus connect_timeout ({}) is not shorter than run.child_deadline ({}): \
                 children waiting that long are killed at the deadline",
                at.path.display(),
                key(field),
                humantime::format_duration(endpoint.connect_timeout + endpoint.answer_wait()),
                humantime::format_duration(run.child_deadline)
            ));
        }
        if endpoint.backoff_cap < endpoint.backoff_base {
            let span = self.backoff_cap.as_ref().map_or(0..0, |v| v.span());
            return Err(at.error(
                span,
                &key("backoff_cap"),
                "must not be shorter than backoff_base",
            ));
        }
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
database = "q.db"
[run]
max_children = 2
[endpoints.a]
url = "http://127.0.0.1:9/hook"
topics = ["t"]
secret = "whsec_c2VjcmV0"
"#;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/cronpost/c.toml"))
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(
            config.database,
            Database::Sqlite("/etc/cronpost/q.db".into())
        );
        assert_eq!(config.run.max_children, 2);
        assert_eq!(config.endpoints[0].secrets[0].key(), b"secret");
        assert_eq!(config.endpoints[0].mode, DeliveryMode::FireAndForget);
        assert!(!format!("{config:?}").contains("secret\""));
        let with_password =
            parse(&GOOD.replace("http://127.0.0.1:9/hook", "http://u:pw-x@127.0.0.1:9/hook"))
                .unwrap();
        assert!(!format!("{with_password:?}").contains("pw-x"));
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query_values() {
        let url = url::Url::parse("https://bob:s3cret@hooks.example.com/in?token=abc&x=1").unwrap();
        assert_eq!(
            redacted(&url),
            "https://***@hooks.example.com/in?token=***&x=***"
        );
        assert_eq!(
            redacted_text("ht tp://bob:pw@host/?k=v"),
            "ht tp://***@host/?***"
        );
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let err = parse(&GOOD.replace(
            "max_children = 2",
            "max_children = 2\nlease_timeout = \"10s\"",
        ))
        .unwrap_err();
        assert_eq!(err.code, ExitCode::Config);
        assert!(
            err.message.contains("line 5: run.lease_timeout"),
            "{}",
            err.message
        );

        let err = parse(&GOOD.replace("topics", "topix")).unwrap_err();
        assert!(
            err.message.contains("line 7") && err.message.contains("topix"),
            "{}",
            err.message
        );

        let err = parse(&GOOD.replace("http://127.0.0.1:9/hook", "ftp:/x")).unwrap_err();
        assert!(
            err.message.contains("line 6: endpoints.a.url"),
            "{}",
            err.message
        );

        let err = parse(&GOOD.replace("whsec_c2VjcmV0", "whsec_%%%")).unwrap_err();
        assert!(
            err.message.contains("endpoints.a.secret"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_database_urls_password_is_never_shown() {
        assert_eq!(
            redacted_database_url("postgres://u:secret@h:5432/q"),
            "postgres://u:***@h:5432/q"
        );
        let shown = redacted_database_url("postgres://u@h/q?password=secret&sslmode=disable");
        assert!(
            !shown.contains("secret") && shown.contains("sslmode=disable"),
            "{shown}"
        );
        assert_eq!(
            redacted_database_url("postgres://u@h/q"),
            "postgres://u@h/q"
        );
        assert_eq!(
            redacted_database_url("postgres://u:secret@h1:5432,h2:5432/q?password=x&a=b"),
            "postgres://u:***@h1:5432,h2:5432/q?password=***&a=b"
        );
    }
}
