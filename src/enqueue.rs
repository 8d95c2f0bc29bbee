//! Publishing: turns `cronpost enqueue` arguments, or NDJSON lines, into
//! validated messages. Every check happens before anything is written, so a
//! bad line rejects the whole batch and the database is left as it was.

use std::io::{BufRead, Read};
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
    /// When it expires, if it does (else its topic's `max_age` decides).
    pub expiry: Option<Expiry>,
    /// Messages with one ordering key reach each endpoint one at a time,
    /// in publication order.
    pub ordering_key: Option<String>,
}

/// When a message stops being worth delivering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// This long after it is published (`--ttl`, NDJSON `ttl`).
    Ttl(Duration),
    /// At this time, Unix epoch ms (`--expires-at`, NDJSON `expires_at`).
    At(i64),
}

impl Expiry {
    /// From a time to live and an absolute expiry, at most one given.
    pub fn from_parts(ttl: Option<&str>, at: Option<&str>) -> Result<Option<Expiry>> {
        match (ttl, at) {
            (Some(_), Some(_)) => Err(Error::data("give a ttl or an expires_at, not both")),
            (Some(ttl), None) => {
                let ttl = humantime::parse_duration(ttl).map_err(|e| {
                    Error::data(format!("ttl {ttl:?} is not a duration like \"30s\" ({e})"))
                })?;
                Ok(Some(Expiry::Ttl(ttl)))
            }
            (None, Some(at)) => {
                let time = humantime::parse_rfc3339_weak(at).map_err(|e| {
                    Error::data(format!(
                        "expires_at {at:?} is not a time like \"2026-12-24T18:00:00Z\" ({e})"
                    ))
                })?;
                let ms = time.duration_since(std::time::UNIX_EPOCH).map_or(0, ms);
                Ok(Some(Expiry::At(ms)))
            }
            (None, None) => Ok(None),
        }
    }
}

impl Draft {
    /// Checks the draft against the config; `now` is its created_at.
    pub fn validate(self, config: &Config, now: i64) -> Result<NewMessage> {
        for (what, text) in [("topic", &self.topic), ("account", &self.account)] {
            if text.trim().is_empty() {
                return Err(Error::data(format!("{what} must not be empty")));
            }
            check_name(what, text)?;
        }
        if let Some(key) = &self.dedup_key {
            check_name("dedup key", key)?;
        }
        if let Some(key) = &self.ordering_key {
            if key.is_empty() {
                return Err(Error::data("ordering key must not be empty"));
            }
            check_name("ordering key", key)?;
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
        if let Some(at) = lone_surrogate(&self.payload) {
            return Err(Error::data(format!(
                "payload is not valid JSON: a lone surrogate escape at byte {at} (\\uD800-\\uDFFF must come in pairs)"
            )));
        }
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
        let available_at = self.delay.map(|d| now + ms(d));
        let expires_at = match self.expiry {
            None => None,
            Some(Expiry::Ttl(ttl)) if ttl.is_zero() => {
                return Err(Error::data("ttl must be longer than 0s"));
            }
            Some(Expiry::Ttl(ttl)) => Some(now.saturating_add(ms(ttl))),
            Some(Expiry::At(at)) if at <= now => {
                return Err(Error::data(
                    "expires_at is not in the future: it would never be sent",
                ));
            }
            Some(Expiry::At(at)) => Some(at),
        };
        if let (Some(expires), Some(available)) = (expires_at, available_at)
            && expires <= available
        {
            return Err(Error::data(
                "it expires before its delay ends: it would never be sent",
            ));
        }
        let topic_max_age = config.topics.get(&self.topic).and_then(|t| t.max_age);
        if let (None, Some(delay), Some(max_age)) = (expires_at, self.delay, topic_max_age)
            && delay >= max_age
        {
            return Err(Error::data(format!(
                "delay {} is not shorter than topic {:?}'s max_age {} ({}): it would expire \
                 before it could be sent (give it a ttl of its own)",
                humantime::format_duration(delay),
                self.topic,
                humantime::format_duration(max_age),
                config.path.display()
            )));
        }
        Ok(NewMessage {
            topic: self.topic,
            account: self.account,
            payload: self.payload,
            priority: self.priority,
            created_at: now,
            available_at,
            dedup_key: self.dedup_key,
            expires_at,
            ordering_key: self.ordering_key,
        })
    }
}

/// The longest topic, account or dedup key, in characters (the limit the
/// schema's trigger checks for plain-SQL producers too).
pub const MAX_NAME_CHARS: usize = 255;

/// Topics, accounts and dedup keys go into headers and logs: no control
/// character (U+0001-U+001F, U+007F, and NUL, as the schema's trigger), and
/// not too long.
fn check_name(what: &str, text: &str) -> Result<()> {
    if text.chars().any(|c| c < ' ' || c == '\u{7f}') {
        return Err(Error::data(format!(
            "{what} {text:?} contains a control character"
        )));
    }
    let chars = text.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(Error::data(format!(
            "{what} is {chars} characters long, over {MAX_NAME_CHARS}"
        )));
    }
    Ok(())
}

/// The first `\\u` escape in JSON text (valid JSON: a string's escapes are
/// well formed) that is half of a UTF-16 surrogate pair without its other
/// half, which many receivers cannot decode; serde skips strings without
/// decoding them, so this looks. Returns its byte offset.
fn lone_surrogate(json: &str) -> Option<usize> {
    let bytes = json.as_bytes();
    let unit = |at: usize| -> Option<u16> {
        let hex = json.get(at + 2..at + 6)?;
        (bytes.get(at..at + 2) == Some(b"\\u"))
            .then(|| u16::from_str_radix(hex, 16).ok())
            .flatten()
    };
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                match unit(i) {
                    Some(0xD800..=0xDBFF) => {
                        if !matches!(unit(i + 6), Some(0xDC00..=0xDFFF)) {
                            return Some(i);
                        }
                        i += 12;
                        continue;
                    }
                    Some(0xDC00..=0xDFFF) => return Some(i),
                    Some(_) => {
                        i += 6;
                        continue;
                    }
                    None => i += 1, // \n, \", \\ ...: skip the escaped byte
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
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
    ttl: Option<String>,
    expires_at: Option<String>,
    ordering_key: Option<String>,
}

/// How much longer than `max_payload_bytes` an NDJSON line may be (its
/// topic, account and other fields).
const LINE_OVERHEAD: usize = 4096;

/// Reads NDJSON (one message object per line; blank lines skipped). Any bad
/// line fails the whole batch, naming its line number. A line is read only
/// up to the longest a valid one can be, so a huge line is refused before
/// it fills memory.
pub fn read_ndjson(config: &Config, mut input: impl BufRead, now: i64) -> Result<Vec<NewMessage>> {
    let max_line = config.max_payload_bytes + LINE_OVERHEAD;
    let mut messages = Vec::new();
    let mut line = Vec::new();
    for number in 1.. {
        let at = |e: Error| e.context(format!("line {number}"));
        line.clear();
        let complete = (&mut input)
            .take(max_line as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io("stdin", e))?;
        if complete == 0 {
            break;
        }
        if line.len() > max_line {
            return Err(at(Error::data(format!(
                "longer than {max_line} bytes (max_payload_bytes = {} plus the other fields)",
                config.max_payload_bytes
            ))));
        }
        let text =
            std::str::from_utf8(&line).map_err(|e| at(Error::data(format!("not UTF-8: {e}"))))?;
        if text.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(text).map_err(|e| at(json_error(&e)))?;
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
            expiry: Expiry::from_parts(parsed.ttl.as_deref(), parsed.expires_at.as_deref())
                .map_err(at)?,
            ordering_key: parsed.ordering_key,
        };
        messages.push(draft.validate(config, now).map_err(at)?);
    }
    Ok(messages)
}

/// A JSON error on one line: its column, without serde_json's "at line 1".
fn json_error(e: &serde_json::Error) -> Error {
    let text = e.to_string();
    let message = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(message, _)| message);
    Error::data(format!("column {}: {message}", e.column()))
}

/// The payload from `input` (stdin), less the newline a shell pipe adds;
/// read only up to `max_bytes` (and that newline), so an oversized payload
/// is refused before it fills memory.
pub fn read_payload(mut input: impl std::io::Read, max_bytes: usize) -> Result<String> {
    let mut bytes = Vec::new();
    input
        .by_ref()
        .take(max_bytes as u64 + 3)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("stdin", e))?;
    while bytes.ends_with(b"\n") || bytes.ends_with(b"\r") {
        bytes.pop();
    }
    if bytes.len() > max_bytes {
        return Err(Error::data(format!(
            "payload on stdin is over max_payload_bytes = {max_bytes}"
        )));
    }
    String::from_utf8(bytes).map_err(|e| Error::data(format!("payload on stdin is not UTF-8: {e}")))
}

#[cfg(test)]
mod tests {
    use super::lone_surrogate;

    #[test]
    fn lone_surrogates_are_found_and_pairs_and_other_escapes_are_not() {
        assert_eq!(lone_surrogate(r#"{"a":"\ud800"}"#), Some(6));
        assert_eq!(lone_surrogate(r#""\udc00x""#), Some(1));
        assert_eq!(lone_surrogate(r#""\ud83d\ude00""#), None);
        assert_eq!(lone_surrogate(r#""\\ud800""#), None, "an escaped backslash");
        assert_eq!(lone_surrogate(r#"{"\"":"\u00e9","n":1e400}"#), None);
        assert_eq!(lone_surrogate(r#"["\ud83d","\ude00"]"#), Some(2));
    }
}
