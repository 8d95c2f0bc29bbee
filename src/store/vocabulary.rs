//! The store's vocabulary: the states and reasons of a delivery, the
//! params of each verb, the rows and reports they return, and the named
//! transitions out of `leased` (`FinishAttempt`'s constructors).

use std::time::Duration;

use crate::adaptive::{Learned, RateChange};
use crate::clock::BootTime;
use crate::saturation::{EndpointLimits, HoldReason, LeasePolicy};

/// The state a delivery is in; always exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeliveryState {
    /// In the priority queue, leasable now.
    Ready,
    /// In the delayed queue until `not_before`, for `reason`.
    Delayed,
    /// Held by a child until its lease expires.
    Leased,
    /// Handed over to the endpoint.
    Delivered,
    /// Given up on; `last_error` says why.
    Dead,
}

impl DeliveryState {
    /// Every state, in queue order.
    pub const ALL: [DeliveryState; 5] = [
        DeliveryState::Ready,
        DeliveryState::Delayed,
        DeliveryState::Leased,
        DeliveryState::Delivered,
        DeliveryState::Dead,
    ];

    /// The name stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Ready => "ready",
            DeliveryState::Delayed => "delayed",
            DeliveryState::Leased => "leased",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    /// The state named `name`, as stored.
    pub fn parse(name: &str) -> Option<DeliveryState> {
        DeliveryState::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// Why a delivery sits in the delayed queue, or why it died (its `reason`).
pub mod reason {
    /// The message was published with a delay.
    pub const SCHEDULED: &str = "scheduled";
    /// A failed attempt waits for its backoff.
    pub const RETRY_BACKOFF: &str = "retry_backoff";
    /// Its account is over its budget; it holds a reserved slot of the account's rate.
    pub const ACCOUNT_BUDGET: &str = "account_budget";
    /// Its endpoint is saturated (429/503, timeouts, refused) and cools down.
    pub const ENDPOINT_SATURATED: &str = "endpoint_saturated";
    /// Its endpoint is over its rate; it holds a reserved slot of the endpoint's rate.
    pub const ENDPOINT_RATE: &str = "endpoint_rate";
    /// Its endpoint is not in the config (any more): parked, never leased,
    /// until the endpoint returns (`deliveries_restore_endpoints`) or an
    /// admin purges it (`cronpost purge --orphaned`).
    pub const ENDPOINT_REMOVED: &str = "endpoint_removed";
    /// An earlier delivery of its ordering key to its endpoint is in
    /// progress: parked (not before year 9999) until that one's finish (or
    /// a run's `deliveries_release_keys`) moves the earliest waiting one of
    /// the key on.
    pub const ORDERING: &str = "ordering";
    /// Dead: the endpoint answered a status that will never succeed (4xx, 3xx).
    pub const REJECTED: &str = "rejected";
    /// Dead: its last attempt (`max_attempts`) failed.
    pub const ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
    /// Dead: its row, or its message's, cannot be decoded (written with plain SQL).
    pub const UNDECODABLE: &str = "undecodable";
    /// Dead: its time to live ran out before it could be delivered.
    pub const EXPIRED: &str = "expired";

    /// The state a delivery with `reason` is in: dead for the reasons it
    /// died for, else delayed.
    pub fn state_of(reason: &str) -> super::DeliveryState {
        match reason {
            REJECTED | ATTEMPTS_EXHAUSTED | UNDECODABLE | EXPIRED => super::DeliveryState::Dead,
            _ => super::DeliveryState::Delayed,
        }
    }

    /// Every reason, as `--reason` takes them.
    pub const ALL: &[&str] = &[
        SCHEDULED,
        RETRY_BACKOFF,
        ACCOUNT_BUDGET,
        ENDPOINT_SATURATED,
        ENDPOINT_RATE,
        ENDPOINT_REMOVED,
        ORDERING,
        REJECTED,
        ATTEMPTS_EXHAUSTED,
        UNDECODABLE,
        EXPIRED,
    ];
}

/// The reason a delivery held back for `hold` is stored with.
pub fn hold_reason(hold: HoldReason) -> &'static str {
    match hold {
        HoldReason::EndpointRemoved => reason::ENDPOINT_REMOVED,
        HoldReason::EndpointSaturated => reason::ENDPOINT_SATURATED,
        HoldReason::EndpointRate => reason::ENDPOINT_RATE,
        HoldReason::AccountBudget => reason::ACCOUNT_BUDGET,
    }
}

/// What a stored reason says the delivery was held back for, if anything.
pub fn held_for(stored: &str) -> Option<HoldReason> {
    [
        HoldReason::EndpointRemoved,
        HoldReason::EndpointSaturated,
        HoldReason::EndpointRate,
        HoldReason::AccountBudget,
    ]
    .into_iter()
    .find(|&hold| hold_reason(hold) == stored)
}

/// Which queue a child takes from first (it falls back to the other).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// The priority queue: `ready`.
    Ready,
    /// Delayed deliveries whose time has come.
    Delayed,
}

/// What an attempt says about its endpoint's health.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EndpointSignal {
    /// Nothing either way (a broken connection, a dead child).
    Unknown,
    /// It answered without saturation: close its circuit breaker, if this
    /// was the breaker's probe (an answer to a request sent before the
    /// breaker opened closes nothing), and end a row of silences.
    Healthy,
    /// It answered 2xx in confirm mode, and learns its rate: healthy, and
    /// the answer's time feeds its answer times (answers slowing down lower
    /// its rate).
    Answered {
        /// How long the attempt took.
        answer_ms: i64,
        /// Its limits (its configured rate caps the learned one).
        limits: EndpointLimits,
    },
    /// 429/503, timed out or refused: open the breaker for a cool-down.
    Saturated {
        /// Its Retry-After, when given.
        retry_after: Option<Duration>,
        /// Its limits (cool-down settings).
        limits: EndpointLimits,
        /// Whether it says the endpoint took too much (429, 503, a
        /// timeout), and so lowers its learned rate where the endpoint is
        /// adaptive: why, when it does (a refused connection says nothing
        /// of a rate).
        slows: Option<RateChange>,
    },
    /// Fire-and-forget, no answer within the window, and the endpoint has a
    /// `slow_after` (in its limits): one more silent answer in a row, which
    /// at the `slow_after`-th opens the breaker as a 429 would.
    Silent {
        /// Its limits (`slow_after`, cool-down settings).
        limits: EndpointLimits,
    },
}

/// What an attempt came to; stored in `attempts.outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The endpoint answered 2xx.
    Delivered,
    /// Fire-and-forget: the request was written and no answer came in the window.
    HandedOver,
    /// A retryable failure; the delivery waits for its backoff.
    Retry,
    /// A permanent failure, or the last attempt failed.
    Dead,
    /// The child died (killed, crashed) before it recorded an outcome.
    ChildDied,
}

impl AttemptOutcome {
    /// The name stored in `attempts.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::HandedOver => "handed_over",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::Dead => "dead",
            AttemptOutcome::ChildDied => "child_died",
        }
    }
}

/// Outcomes the store writes itself, besides [`AttemptOutcome`].
pub mod outcome {
    /// The attempt is still going (or its child vanished unseen).
    pub const IN_FLIGHT: &str = "in_flight";
    /// The lease ran out before the child recorded an outcome.
    pub const LEASE_EXPIRED: &str = "lease_expired";
    /// The child recorded an outcome after its lease had been taken back.
    pub const LEASE_LOST: &str = "lease_lost";
}

/// A message to insert (`MessageInsertMany`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    /// Topic, routed to its subscribers.
    pub topic: String,
    /// The account that published it.
    pub account: String,
    /// JSON text, sent byte for byte as the body.
    pub payload: String,
    /// Higher goes first.
    pub priority: i64,
    /// Insert time.
    pub created_at: i64,
    /// Not delivered before this time.
    pub available_at: Option<i64>,
    /// A second message with the same key is not inserted.
    pub dedup_key: Option<String>,
    /// Not delivered after this time: expired instead (None: its topic's
    /// `max_age` decides).
    pub expires_at: Option<i64>,
    /// Messages with one key go to each endpoint one at a time, in
    /// publication order.
    pub ordering_key: Option<String>,
}

/// What `messages_insert` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InsertReport {
    /// Messages written.
    pub inserted: usize,
    /// Messages skipped because their account's dedup key was already there.
    pub duplicates: usize,
    /// The ids of the messages written, in input order.
    pub messages: Vec<InsertedMessage>,
}

/// The ids of one inserted message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InsertedMessage {
    /// Its id (`show` takes it).
    pub id: i64,
    /// Its stable id, the `webhook-id` (`msg_...`).
    pub uid: String,
}

/// How `message_get` finds a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageKey {
    /// By its id.
    Id(i64),
    /// By its uid (`msg_...`).
    Uid(String),
}

/// One endpoint subscribing to one topic, with the topic's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The topic.
    pub topic: String,
    /// The endpoint's name.
    pub endpoint: String,
    /// A message without an expiry of its own expires this long after it
    /// was created (None: never).
    pub max_age_ms: Option<i64>,
    /// An expired delivery is removed instead of kept as a dead letter.
    pub discard_expired: bool,
    /// A dead delivery keeps its ordering key blocked (the endpoint's
    /// `on_dead = "block"`) instead of releasing it.
    pub block_key_on_dead: bool,
}

impl Subscription {
    /// `endpoint` subscribing to `topic`, with the default settings.
    pub fn new(topic: &str, endpoint: &str) -> Subscription {
        Subscription {
            topic: topic.to_string(),
            endpoint: endpoint.to_string(),
            max_age_ms: None,
            discard_expired: false,
            block_key_on_dead: false,
        }
    }
}

/// Params of `messages_route`.
#[derive(Clone, Copy, Debug)]
pub struct RouteParams {
    /// Now.
    pub now: i64,
    /// Messages routed in this call (one transaction), so a large backlog
    /// never holds the write lock for long.
    pub batch_size: usize,
}

/// What one `messages_route` batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteReport {
    /// Messages given their deliveries.
    pub messages: usize,
    /// Deliveries created (fan-out: one per subscribed endpoint).
    pub deliveries: usize,
    /// Messages no endpoint subscribes to, marked unroutable (once: they
    /// are not looked at again; see `route_error`).
    pub unroutable: usize,
    /// Their topics.
    pub unroutable_topics: Vec<String>,
    /// Whether the batch was full: more unrouted messages may wait.
    pub more: bool,
}

/// Params of `delivery_lease_next`.
#[derive(Clone)]
pub struct LeaseParams<'a> {
    /// A token unique to the leasing child.
    pub owner: String,
    /// The child's pid, recorded on the attempt.
    pub pid: u32,
    /// The run the child belongs to.
    pub run_id: Option<i64>,
    /// Now.
    pub now: i64,
    /// How long the lease holds.
    pub lease_timeout_ms: i64,
    /// The queue to take from first.
    pub prefer: Queue,
    /// Budgets and endpoint limits.
    pub policy: &'a dyn LeasePolicy,
    /// The boot clock now, when the backend times leases by it (SQLite:
    /// every process is on one host).
    pub boot: Option<BootTime>,
}

/// Params of `leases_reclaim_expired`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimParams {
    /// Now, on the wall clock.
    pub now: i64,
    /// The boot clock now: a lease taken on this boot is reclaimed only
    /// when this clock says it expired, so a wall-clock jump cannot take a
    /// delivery from a live child. None: the wall clock decides.
    pub boot: Option<BootTime>,
}

/// A leased delivery with what its POST needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The delivery.
    pub delivery_id: i64,
    /// The attempt row opened by the lease.
    pub attempt_id: i64,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    /// The lease token.
    pub owner: String,
    /// The endpoint's name.
    pub endpoint: String,
    /// The message's stable id (`webhook-id`).
    pub message_uid: String,
    /// The message's topic.
    pub topic: String,
    /// The message's account.
    pub account: String,
    /// The body.
    pub payload: String,
    /// Its ordering key, if it has one: its finish releases the key's next
    /// delivery.
    pub ordering_key: Option<String>,
}

/// Where a finished attempt leaves its delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextState {
    /// `delivered`.
    Delivered,
    /// `delayed` with reason `retry_backoff` until `not_before`.
    Retry {
        /// When the delivery may be tried again.
        not_before: i64,
    },
    /// `dead`, for `reason` (see [`reason`]).
    Dead {
        /// Why it died.
        reason: &'static str,
    },
}

/// Params of `attempt_finish`: records an attempt and moves its delivery out
/// of `leased`, if and only if the lease is still held by `owner`, and
/// updates its endpoint's health. Built by one constructor per transition.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishAttempt {
    /// The delivery.
    pub delivery_id: i64,
    /// Its endpoint.
    pub endpoint: String,
    /// The attempt row.
    pub attempt_id: i64,
    /// The lease token that must still hold the delivery.
    pub owner: String,
    /// Now.
    pub now: i64,
    /// What the attempt came to.
    pub outcome: AttemptOutcome,
    /// Where the delivery goes.
    pub next: NextState,
    /// The HTTP status, when an answer came.
    pub http_status: Option<u16>,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// How long the attempt took.
    pub duration_ms: i64,
    /// What it says about the endpoint.
    pub signal: EndpointSignal,
    /// The delivery's ordering key: leaving progress (delivered, dead), it
    /// releases the key's next delivery in the same transaction.
    pub ordering_key: Option<String>,
}

impl FinishAttempt {
    fn new(lease: &Lease, now: i64, outcome: AttemptOutcome, next: NextState) -> FinishAttempt {
        FinishAttempt {
            delivery_id: lease.delivery_id,
            endpoint: lease.endpoint.clone(),
            attempt_id: lease.attempt_id,
            owner: lease.owner.clone(),
            now,
            outcome,
            next,
            http_status: None,
            error: None,
            duration_ms: 0,
            signal: EndpointSignal::Unknown,
            ordering_key: lease.ordering_key.clone(),
        }
    }

    /// leased → delivered (a 2xx, or handed over when `outcome` says so).
    pub fn delivered(lease: &Lease, now: i64, outcome: AttemptOutcome) -> FinishAttempt {
        FinishAttempt::new(lease, now, outcome, NextState::Delivered)
    }

    /// leased → delayed (`retry_backoff`) until `not_before`.
    pub fn retry(lease: &Lease, now: i64, not_before: i64, error: String) -> FinishAttempt {
        FinishAttempt {
            error: Some(error),
            ..FinishAttempt::new(
                lease,
                now,
                AttemptOutcome::Retry,
                NextState::Retry { not_before },
            )
        }
    }

    /// leased → dead, for `reason` (see [`reason`]).
    pub fn dead(lease: &Lease, now: i64, reason: &'static str, error: String) -> FinishAttempt {
        FinishAttempt {
            error: Some(error),
            ..FinishAttempt::new(lease, now, AttemptOutcome::Dead, NextState::Dead { reason })
        }
    }

    /// Sets the attempt's HTTP status and duration.
    pub fn with_answer(mut self, http_status: Option<u16>, duration_ms: i64) -> FinishAttempt {
        self.http_status = http_status;
        self.duration_ms = duration_ms;
        self
    }

    /// Sets what the attempt says about its endpoint.
    pub fn with_signal(mut self, signal: EndpointSignal) -> FinishAttempt {
        self.signal = signal;
        self
    }

    /// Records that the child died before it finished, whatever `next` says.
    pub fn by_dead_child(mut self) -> FinishAttempt {
        self.outcome = AttemptOutcome::ChildDied;
        self
    }

    /// The ordering key this finish releases the next delivery of: its
    /// delivery's, when it leaves progress (delivered or dead; where a dead
    /// one blocks its key, the release finds the key busy).
    pub fn releases_key(&self) -> Option<&str> {
        match self.next {
            NextState::Retry { .. } => None,
            NextState::Delivered | NextState::Dead { .. } => self.ordering_key.as_deref(),
        }
    }

    /// The state, `not_before` and reason its delivery moves to, given the
    /// time its endpoint is saturated until (if it is): a retry waits for
    /// the cool-down too.
    pub fn moves_to(
        &self,
        saturated_until: Option<i64>,
    ) -> (DeliveryState, i64, Option<&'static str>) {
        match (self.next, saturated_until) {
            (NextState::Delivered, _) => (DeliveryState::Delivered, self.now, None),
            (NextState::Retry { not_before }, None) => (
                DeliveryState::Delayed,
                not_before,
                Some(reason::RETRY_BACKOFF),
            ),
            (NextState::Retry { not_before }, Some(until)) => (
                DeliveryState::Delayed,
                not_before.max(until),
                Some(reason::ENDPOINT_SATURATED),
            ),
            (NextState::Dead { reason }, _) => (DeliveryState::Dead, self.now, Some(reason)),
        }
    }
}

/// A dispatcher run's counters (`run_begin` / `run_finish`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunRecord {
    /// The run's id.
    pub id: i64,
    /// The parent's pid.
    pub pid: u32,
    /// The host it ran on (`host_name`).
    pub host: String,
    /// Start.
    pub started_at: i64,
    /// End, once finished.
    pub finished_at: Option<i64>,
    /// Messages routed.
    pub routed: u64,
    /// Expired leases taken back.
    pub reclaimed: u64,
    /// Children forked.
    pub forked: u64,
    /// Deliveries delivered.
    pub delivered: u64,
    /// Attempts that will be retried.
    pub retried: u64,
    /// Deliveries gone dead.
    pub dead: u64,
    /// Children that died or failed without an outcome.
    pub failed: u64,
    /// Children that found nothing they could lease (another run took it,
    /// or it was held back by then).
    pub found_nothing: u64,
    /// Deliveries whose time to live ran out, made dead letters.
    pub expired: u64,
    /// Deliveries whose time to live ran out, removed (`discard_expired`).
    pub discarded: u64,
}

/// Which deliveries an admin command is about; empty fields match all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    /// Only these delivery ids.
    pub ids: Vec<i64>,
    /// Only in this state.
    pub state: Option<DeliveryState>,
    /// Only to this endpoint.
    pub endpoint: Option<String>,
    /// Only of this account.
    pub account: Option<String>,
    /// Only of this topic.
    pub topic: Option<String>,
    /// Only with this reason (why delayed, or why dead; see [`reason`]).
    pub reason: Option<String>,
    /// Only those that last changed (died, for dead letters) at or after this.
    pub since: Option<i64>,
    /// Only those of this ordering key.
    pub ordering_key: Option<String>,
}

/// A delivery with its message's topic and uid, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedDelivery {
    /// The delivery.
    pub delivery: DeliveryRow,
    /// Its message's topic.
    pub topic: String,
    /// Its message's uid (`webhook-id`).
    pub uid: String,
    /// When it was created (routed).
    pub created_at: i64,
}

/// A message as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRow {
    /// Its id.
    pub id: i64,
    /// Its stable id (`webhook-id`).
    pub uid: String,
    /// Topic.
    pub topic: String,
    /// Account.
    pub account: String,
    /// JSON payload.
    pub payload: String,
    /// Priority.
    pub priority: i64,
    /// Insert time.
    pub created_at: i64,
    /// Not before.
    pub available_at: Option<i64>,
    /// Dedup key.
    pub dedup_key: Option<String>,
    /// Expires at (its own; a topic's `max_age` applies at routing).
    pub expires_at: Option<i64>,
    /// Its ordering key.
    pub ordering_key: Option<String>,
    /// When it was routed.
    pub routed_at: Option<i64>,
    /// Why no endpoint took it (unroutable), when none did.
    pub route_error: Option<String>,
}

/// Params of `deliveries_requeue`: dead or delayed → ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequeueParams {
    /// Which deliveries; only dead and delayed ones are requeued.
    pub filter: DeliveryFilter,
    /// Now.
    pub now: i64,
    /// At most this many, oldest first (None: all).
    pub limit: Option<u64>,
    /// Milliseconds between the due times of two requeued deliveries, so a
    /// recovered endpoint is not hit by the whole backlog at once: the
    /// first is ready now, the others delayed (`scheduled`) until theirs.
    /// 0: all ready now.
    pub spacing_ms: i64,
    /// Dead letters that expired too (else they are left alone); requeued,
    /// their expiry is lifted and they are sent late.
    pub expired: bool,
    /// Count, change nothing.
    pub dry_run: bool,
}

/// Params of `deliveries_expire`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpireParams {
    /// Now: deliveries that expire at or before it are expired.
    pub now: i64,
    /// At most this many in one call (one transaction).
    pub batch: u64,
}

/// What one `deliveries_expire` batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpireReport {
    /// Deliveries made dead letters (reason `expired`).
    pub expired: u64,
    /// Deliveries removed (their topic says `discard_expired`).
    pub discarded: u64,
}

/// Params of `deliveries_purge_orphaned`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgeOrphanedParams {
    /// Only this endpoint's (else every removed endpoint's).
    pub endpoint: Option<String>,
    /// The endpoints in the config now: never purged.
    pub configured: Vec<String>,
    /// Count, change nothing.
    pub dry_run: bool,
}

/// One batch of retention (`history_purge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PurgeParams {
    /// Delivered deliveries last changed before this go, and so do routed
    /// messages created before it that are left with no delivery, and run
    /// records started before it (the latest run stays).
    pub delivered_before: i64,
    /// Dead letters last changed before this go (None: none do).
    pub dead_before: Option<i64>,
    /// At most this many rows of each kind.
    pub batch: u64,
}

/// What one `history_purge` batch removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Delivered deliveries (with their attempts).
    pub deliveries: u64,
    /// Dead letters (with their attempts).
    pub dead: u64,
    /// Messages left with no delivery.
    pub messages: u64,
    /// Run records.
    pub runs: u64,
}

/// Every recorded run added up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunTotals {
    /// Runs recorded.
    pub runs: u64,
    /// Their counters, summed (ids and times unused).
    pub sums: RunRecord,
}

/// A delivery as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryRow {
    /// Its id.
    pub id: i64,
    /// Its message.
    pub message_id: i64,
    /// Its endpoint.
    pub endpoint: String,
    /// Its message's account.
    pub account: String,
    /// Its state.
    pub state: DeliveryState,
    /// Its priority.
    pub priority: i64,
    /// Delayed: when it is eligible; else when it last changed queue.
    pub not_before: i64,
    /// Why it is delayed, or why it died.
    pub reason: Option<String>,
    /// The lease token, while leased.
    pub lease_owner: Option<String>,
    /// When the lease expires, while leased.
    pub lease_expires_at: Option<i64>,
    /// Attempts started.
    pub attempts: u32,
    /// Last HTTP status seen.
    pub last_status: Option<u16>,
    /// Last error seen.
    pub last_error: Option<String>,
    /// When it expires, if it does: its message's own expiry, or its
    /// topic's `max_age` from when it was published.
    pub expires_at: Option<i64>,
    /// Its message's ordering key, if it has one.
    pub ordering_key: Option<String>,
}

/// An attempt as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRow {
    /// Its id.
    pub id: i64,
    /// Its delivery.
    pub delivery_id: i64,
    /// Its number (1 for the first).
    pub number: u32,
    /// The run it belongs to.
    pub run_id: Option<i64>,
    /// The child's pid.
    pub pid: u32,
    /// Start.
    pub started_at: i64,
    /// End.
    pub finished_at: Option<i64>,
    /// Outcome name (see [`AttemptOutcome`] and [`outcome`]).
    pub outcome: String,
    /// HTTP status, when an answer came.
    pub http_status: Option<u16>,
    /// What went wrong.
    pub error: Option<String>,
    /// Duration.
    pub duration_ms: Option<i64>,
}

/// Delivery counts of one endpoint, by state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounts {
    /// The endpoint.
    pub endpoint: String,
    /// Count per state, in [`DeliveryState::ALL`] order.
    pub by_state: [u64; 5],
}

/// An account held back by its budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldAccount {
    /// The account.
    pub account: String,
    /// Its deliveries waiting for a slot.
    pub delayed: u64,
    /// When its last reserved slot comes.
    pub until: i64,
}

/// An endpoint's circuit breaker, when open or recovering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointHealth {
    /// The endpoint.
    pub endpoint: String,
    /// Saturated until (None or past: the cool-down is over; a probe may go).
    pub saturated_until: Option<i64>,
    /// Saturation signals in a row.
    pub failures: u32,
    /// The last signal.
    pub last_error: Option<String>,
}

/// What an endpoint has learned of its rate (`adaptive`).
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointRate {
    /// The endpoint.
    pub endpoint: String,
    /// Its learned rate, why and when it last changed.
    pub learned: Learned,
}

/// A picture of the queue (`cronpost stats`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// When it was taken.
    pub now: i64,
    /// Counts per endpoint and state.
    pub endpoints: Vec<EndpointCounts>,
    /// How long the oldest ready delivery has waited.
    pub oldest_ready_age_ms: Option<i64>,
    /// Messages not routed yet (new, or no subscriber).
    pub unrouted_messages: u64,
    /// The latest run.
    pub last_run: Option<RunRecord>,
    /// Attempts of the latest run, by outcome.
    pub last_run_attempts: Vec<(String, u64)>,
    /// Accounts held back by their budget.
    pub held_accounts: Vec<HeldAccount>,
    /// Endpoints whose circuit breaker is open or half-open.
    pub saturated_endpoints: Vec<EndpointHealth>,
    /// Endpoints with a learned rate, by name.
    pub learned_rates: Vec<EndpointRate>,
    /// Endpoints gone from the config, with their parked deliveries.
    pub orphaned: Vec<(String, u64)>,
    /// Messages marked unroutable (no endpoint subscribed to their topic).
    pub unroutable_messages: u64,
}
