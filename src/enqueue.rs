//! Publishing: turns `cronpost enqueue` arguments, or NDJSON lines, into
//! validated messages. Every check happens before anything is written, so a
//! bad line rejects the whole batch and the database is left as it was.

use std::io::BufRead;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::routing;
use crate::store::{NewMessage, ms};

/// Priorities outside this range are refused as mistakes.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = -1000..=1000;
/// The longest delay a message may be published with.
pub const MAX_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

/// One message as a producer describes it, before validation.
#[derive(Clone, Debug, Default)]
pub struct Draft {
    /// Topic.
    pub topic: String,
    /// Account.
    pub account: String,
    /// JSON payload text.
    pub payload: String,
    /// Priority (higher first).
    pub priority: i64,
    /// Delay before it may be delivered.
    pub delay: Option<Duration>,
    /// Dedup key.
    pub dedup_key: Option<String>,
}

impl Draft {
    /// Checks the draft against the config; `now` is its created_at.
    pub fn validate(self, config: &Config, now: i64) -> Result<NewMessage> {
        if self.topic.trim().is_empty() {
            return Err(Error::data("topic must not be empty"));
        }
        if self.account.trim().is_empty() {
            return Err(Error::data("account must not be empty"));
        }
        routing::check_topic(config, &self.topic)?;
        if self.payload.len() > config.max_payload_bytes {
            return Err(Error::data(format!(
                "payload is {} bytes, over max_payload_bytes = {}",
                self.payload.len(),
                config.max_payload_bytes
            )));
        }
        serde_json::from_str::<serde::de::IgnoredAny>(&self.payload)
            .map_err(|e| Error::data(format!("payload is not valid JSON: {e}")))?;
        // Valid JSON is an object exactly when it opens with a brace.
        if config.require_object_payload && !self.payload.trim_start().starts_with('{') {
            return Err(Error::data(format!(
                "payload must be a JSON object (require_object_payload in {}), not {}",
                config.path.display(),
                json_kind(self.payload.trim_start())
            )));
        }
        if !PRIORITY_RANGE.contains(&self.priority) {
            return Err(Error::data(format!(
                "priority {} is outside {}..={}",
                self.priority,
                PRIORITY_RANGE.start(),
                PRIORITY_RANGE.end()
            )));
        }
        if let Some(delay) = self.delay
            && delay > MAX_DELAY
        {
            return Err(Error::data(format!(
                "delay {} is longer than {}",
                humantime::format_duration(delay),
                humantime::format_duration(MAX_DELAY)
            )));
        }
        if self.dedup_key.as_deref().is_some_and(|k| k.is_empty()) {
            return Err(Error::data("dedup key must not be empty"));
        }
        Ok(NewMessage {
            topic: self.topic,
            account: self.account,
            payload: self.payload,
            priority: self.priority,
            created_at: now,
            available_at: self.delay.map(|d| now + ms(d)),
            dedup_key: self.dedup_key,
        })
    }
}

/// What kind of JSON value valid JSON text is, from its first character.
fn json_kind(json: &str) -> &'static str {
    match json.as_bytes().first() {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Parses a delay such as "30s" or "5m".
pub fn parse_delay(text: &str) -> Result<Duration> {
    humantime::parse_duration(text).map_err(|e| {
        Error::data(format!(
            "delay {text:?} is not a duration like \"30s\" ({e})"
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    topic: String,
    account: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    priority: i64,
    delay: Option<String>,
    dedup_key: Option<String>,
}

/// Reads NDJSON (one message object per line; blank lines skipped). Any bad
/// line fails the whole batch, naming its line number.
pub fn read_ndjson(config: &Config, input: impl BufRead, now: i64) -> Result<Vec<NewMessage>> {
    let mut messages = Vec::new();
    for (i, line) in input.split(b'\n').enumerate() {
        let at = |e: Error| e.context(format!("line {}", i + 1));
        let line = line.map_err(|e| Error::io("stdin", e))?;
        let line =
            std::str::from_utf8(&line).map_err(|e| at(Error::data(format!("not UTF-8: {e}"))))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line =
            serde_json::from_str(line).map_err(|e| at(Error::data(format!("{e}"))))?;
        let draft = Draft {
            topic: parsed.topic,
            account: parsed.account,
            payload: parsed.payload.get().to_string(),
            priority: parsed.priority,
            delay: parsed
                .delay
                .as_deref()
                .map(parse_delay)
                .transpose()
                .map_err(at)?,
            dedup_key: parsed.dedup_key,
        };
        messages.push(draft.validate(config, now).map_err(at)?);
    }
    Ok(messages)
}
