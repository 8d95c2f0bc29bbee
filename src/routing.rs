//! Routing: which endpoints a topic fans out to. The config's `topics` lists
//! become the store's subscriptions; the store turns each new message into
//! one delivery per subscribed endpoint (SNS-style fan-out), so one failing
//! subscriber never holds back another.

use crate::config::{Config, OnDead};
use crate::error::{Error, Result};
use crate::store::{RouteParams, RouteReport, Store, Subscription, ms};

/// Messages routed per transaction.
pub const ROUTE_BATCH: usize = 5_000;

/// Every (topic, endpoint) pair the config subscribes, with the topic's
/// settings.
pub fn subscriptions(config: &Config) -> Vec<Subscription> {
    config
        .endpoints
        .iter()
        .flat_map(|e| {
            e.topics.iter().map(|t| {
                let settings = config.topics.get(t).cloned().unwrap_or_default();
                Subscription {
                    max_age_ms: settings.max_age.map(ms),
                    discard_expired: settings.discard_expired,
                    block_key_on_dead: e.on_dead == OnDead::Block,
                    ..Subscription::new(t, &e.name)
                }
            })
        })
        .collect()
}

/// The endpoints subscribed to `topic`.
pub fn subscribers<'c>(config: &'c Config, topic: &str) -> Vec<&'c str> {
    config
        .endpoints
        .iter()
        .filter(|e| e.topics.iter().any(|t| t == topic))
        .map(|e| e.name.as_str())
        .collect()
}

/// Rejects a topic nobody subscribes to: publishing it would be a silent drop.
pub fn check_topic(config: &Config, topic: &str) -> Result<()> {
    if subscribers(config, topic).is_empty() {
        let mut known: Vec<&str> = config
            .endpoints
            .iter()
            .flat_map(|e| e.topics.iter().map(String::as_str))
            .collect();
        known.sort_unstable();
        known.dedup();
        return Err(Error::data(format!(
            "unknown topic {topic:?}: no endpoint in {} subscribes to it (known topics: {})",
            config.path.display(),
            known.join(", ")
        )));
    }
    Ok(())
}

/// Routes every unrouted message, one batch (one transaction) at a time,
/// calling `between` after each batch (the daemon's watchdog beats there).
/// Returns the batches' reports added up.
pub fn route_all(
    store: &mut dyn Store,
    now: i64,
    between: &mut dyn FnMut(),
) -> Result<RouteReport> {
    route_all_in_batches(store, now, ROUTE_BATCH, between)
}

/// [`route_all`] with batches of `batch_size`.
pub fn route_all_in_batches(
    store: &mut dyn Store,
    now: i64,
    batch_size: usize,
    between: &mut dyn FnMut(),
) -> Result<RouteReport> {
    let mut total = RouteReport::default();
    loop {
        let batch = store.messages_route(RouteParams { now, batch_size })?;
        total.messages += batch.messages;
        total.deliveries += batch.deliveries;
        total.unroutable += batch.unroutable;
        total.unroutable_topics.extend(batch.unroutable_topics);
        between();
        if !batch.more {
            break;
        }
    }
    total.unroutable_topics.sort();
    total.unroutable_topics.dedup();
    if total.unroutable > 0 {
        log::warn!(
            "{} messages marked unroutable: no endpoint subscribes to {} (see the unroutable_messages view)",
            total.unroutable,
            total.unroutable_topics.join(", ")
        );
    }
    Ok(total)
}
