//! Retention: delivered history (deliveries, their attempts, the messages
//! left with none, old run records) and, after `dead_retention`, dead
//! letters are removed in small batches, one
//! transaction each, so a run waiting for the write lock waits milliseconds.
//! Runs purge a bounded amount at their end; `cronpost purge` until done.

use crate::error::Result;
use crate::store::{PurgeParams, PurgeReport, Store};

/// Rows removed per purge transaction: small enough that a run waiting for
/// the write lock waits milliseconds, not seconds.
pub const PURGE_BATCH: u64 = 2_000;

/// Removes the history `delivered_before` and `dead_before` name (see
/// [`PurgeParams`]), in batches of [`PURGE_BATCH`], at most `max_batches`
/// (None: until none is left),
/// calling `between` after each; returns the reports added up and the
/// number of batches. Runs (bounded, for retention) and `cronpost purge`
/// (unbounded) share it.
pub fn purge(
    store: &mut dyn Store,
    delivered_before: i64,
    dead_before: Option<i64>,
    max_batches: Option<usize>,
    between: &mut dyn FnMut(),
) -> Result<(PurgeReport, usize)> {
    let mut total = PurgeReport::default();
    let mut batches = 0;
    while max_batches.is_none_or(|max| batches < max) {
        let report = store.history_purge(&PurgeParams {
            delivered_before,
            dead_before,
            batch: PURGE_BATCH,
        })?;
        batches += 1;
        between();
        total.deliveries += report.deliveries;
        total.dead += report.dead;
        total.messages += report.messages;
        total.runs += report.runs;
        if report.deliveries + report.dead + report.messages + report.runs == 0 {
            break;
        }
    }
    Ok((total, batches))
}
