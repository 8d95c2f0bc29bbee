//! A child: forked by the dispatcher, it opens its own database connection
//! and HTTP client (nothing of either crosses the fork), leases ONE delivery,
//! POSTs it, records the outcome and exits. Its exit code tells the parent
//! what happened, so the parent needs no database read per child.

use std::time::Instant;

use crate::config::Config;
use crate::delivery::Client;
use crate::error::Error;
use crate::lease;
use crate::steps::Step;
use crate::store::{FinishAttempt, LeaseParams, Queue, Store, ms, now_ms};

/// What a child's exit code says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildExit {
    /// The delivery was delivered (or handed over).
    Delivered = 0,
    /// The attempt failed; the delivery waits to be retried.
    Retry = 10,
    /// The delivery went dead.
    Dead = 11,
    /// Nothing could be leased (none ready, or all held back).
    Empty = 12,
    /// The lease ran out before the outcome could be recorded.
    LeaseLost = 13,
    /// The child failed (database error, bad state); see its log line.
    Failed = 70,
}

impl ChildExit {
    /// The meaning of an exit code.
    pub fn from_code(code: i32) -> ChildExit {
        match code {
            0 => ChildExit::Delivered,
            10 => ChildExit::Retry,
            11 => ChildExit::Dead,
            12 => ChildExit::Empty,
            13 => ChildExit::LeaseLost,
            _ => ChildExit::Failed,
        }
    }
}

/// Who a child is: its lease token and its run.
#[derive(Clone, Debug)]
pub struct ChildContext {
    /// Lease token, unique to this child.
    pub owner: String,
    /// The parent's run id.
    pub run_id: i64,
    /// The queue to take from first.
    pub prefer: Queue,
    /// The kernel's boot id (read by the parent once): with the boot
    /// clock, it times the child's lease.
    pub boot_id: Option<String>,
    /// When the child must be gone: its POST ends early enough to record
    /// the outcome before.
    pub deadline: Instant,
}

/// The whole life of a child; returns its exit code.
pub fn main(config: &Config, ctx: &ChildContext) -> ChildExit {
    main_traced(config, ctx, &mut |_| {})
}

/// [`main`], calling `mark` as each [`Step`] ends.
pub fn main_traced(config: &Config, ctx: &ChildContext, mark: &mut dyn FnMut(Step)) -> ChildExit {
    let delivered = crate::store::open_existing(config)
        .inspect(|_| mark(Step::Opened))
        .and_then(|mut store| {
            let exit = deliver_one(store.as_mut(), &mut Client::one_shot(), config, ctx, mark);
            store.close_at_exit();
            exit
        });
    match delivered {
        Ok(exit) => exit,
        Err(e) => {
            log::error!("child {}: {e}", std::process::id());
            ChildExit::Failed
        }
    }
}

/// A child's work once its connection is open: leases one delivery, POSTs
/// it with `client`, records the outcome. The benchmark's no-fork harness
/// calls it in a loop with one store and one kept-alive client.
pub fn deliver_one(
    store: &mut dyn Store,
    client: &mut Client,
    config: &Config,
    ctx: &ChildContext,
    mark: &mut dyn FnMut(Step),
) -> Result<ChildExit, Error> {
    let now = now_ms();
    let params = LeaseParams {
        owner: ctx.owner.clone(),
        pid: std::process::id(),
        run_id: Some(ctx.run_id),
        now,
        lease_timeout_ms: ms(config.run.lease_timeout),
        prefer: ctx.prefer,
        policy: config,
        boot: ctx.boot_id.as_deref().and_then(crate::clock::boot_time),
    };
    let lease = store.delivery_lease_next(&params)?;
    mark(Step::Leased);
    let Some(lease) = lease else {
        return Ok(ChildExit::Empty);
    };
    let finish = match config.endpoint(&lease.endpoint) {
        // Its endpoint left the config: keep the delivery for when it returns.
        None => FinishAttempt::retry(
            &lease,
            now,
            now + ms(config.run.lease_timeout),
            format!(
                "endpoint {:?} is not in {}",
                lease.endpoint,
                config.path.display()
            ),
        ),
        Some(endpoint) => {
            let started = Instant::now();
            // Leave time to record the outcome before the deadline (a wait
            // for the lock at worst), but never most of the child's life.
            let reserve = config.busy_timeout.min(config.run.child_deadline / 4);
            let post_deadline = ctx.deadline.checked_sub(reserve).unwrap_or(ctx.deadline);
            let result = client.post(endpoint, &lease, now / 1000, post_deadline, mark);
            let finished = now_ms();
            lease::decide(endpoint, &lease, &result, finished, ms(started.elapsed()))
        }
    };
    let recorded = store.attempt_finish(&finish)?;
    mark(Step::Recorded);
    if !recorded {
        log::warn!(
            "child {}: delivery {} was taken back before its outcome was recorded (lease_timeout too short?)",
            std::process::id(),
            lease.delivery_id
        );
        return Ok(ChildExit::LeaseLost);
    }
    Ok(match finish.next {
        crate::store::NextState::Delivered => ChildExit::Delivered,
        crate::store::NextState::Retry { .. } => ChildExit::Retry,
        crate::store::NextState::Dead { .. } => ChildExit::Dead,
    })
}
