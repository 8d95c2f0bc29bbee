//! The delivery a lease transaction is looking at, as both backends pick
//! it: its row, its endpoint's breaker, and the queue it came from.

use super::{Queue, held_for};
use crate::saturation::{self, RateKind};

/// A delivery a lease transaction is looking at.
pub(super) struct Candidate {
    pub id: i64,
    pub endpoint: String,
    pub account: String,
    pub reason: Option<String>,
    pub not_before: i64,
    /// Its endpoint's breaker: saturated until, signals in a row.
    pub saturated_until: Option<i64>,
    pub failures: u32,
    pub from: Queue,
}

impl Candidate {
    /// Its key of `kind`: its account or its endpoint.
    pub fn key(&self, kind: RateKind) -> &str {
        match kind {
            RateKind::Account => &self.account,
            RateKind::Endpoint => &self.endpoint,
        }
    }

    /// What `saturation::decide` looks at.
    pub fn view(&self) -> saturation::Candidate<'_> {
        saturation::Candidate {
            endpoint: &self.endpoint,
            account: &self.account,
            held_for: self.reason.as_deref().and_then(held_for),
            not_before: self.not_before,
            saturated_until: self.saturated_until,
            failures: self.failures,
        }
    }
}
