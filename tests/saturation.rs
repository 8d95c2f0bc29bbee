//! Saturation end to end: account budgets, saturated endpoints, in-flight
//! caps and the delayed queue, with the real binary, real children and a
//! real receiver on 127.0.0.1 that counts, delays and refuses; the
//! `on_both_backends!` ones on SQLite and on PostgreSQL.

mod common;

use std::collections::HashMap;

use std::time::{Duration, Instant};

use common::*;

on_both_backends!(
    retry_after_holds_a_saturated_endpoint_while_others_are_not_slowed,
    a_down_endpoint_is_probed_once_per_cool_down_and_drains_when_back,
    eligible_delayed_deliveries_are_not_starved_by_a_ready_backlog,
    budget_and_saturation_state_survive_between_runs,
    an_endpoint_that_accepts_and_never_answers_is_held_after_slow_after_silences,
);

fn ndjson(messages: impl IntoIterator<Item = (String, String, i64)>) -> String {
    messages
        .into_iter()
        .map(|(topic, account, priority)| {
            format!("{{\"topic\":\"{topic}\",\"account\":\"{account}\",\"payload\":{{}},\"priority\":{priority}}}\n")
        })
        .collect()
}

fn delivered_of_account(env: &Env, account: &str) -> i64 {
    assert!(account.chars().all(|c| c.is_ascii_alphanumeric()));
    env.query_i64(&format!(
        "SELECT count(*) FROM deliveries WHERE state = 'delivered' AND account = '{account}'"
    ))
}

fn stats(env: &Env) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["stats", "--json"])).unwrap()
}

#[test]
fn a_noisy_account_is_rate_limited_while_quiet_accounts_flow_in_the_first_run() {
    let rx = Receiver::start();
    let env = Env::new(
        "max_children = 8\nmax_messages = 100000",
        &format!(
            "[account_budget.overrides]\nnoisy = {{ rate = 50 }}\n\n{}",
            endpoint("hook", &rx.url("/hook"), &["t"], "")
        ),
    );
    env.enqueue_ndjson(&ndjson((0..5000).map(|_| ("t".into(), "noisy".into(), 0))));
    env.enqueue_ndjson(&ndjson(
        (0..200).map(|i| ("t".into(), format!("quiet{}", i % 10), 0)),
    ));

    let started = Instant::now();
    env.run();
    let first_run = started.elapsed();

    assert_eq!(
        env.query_i64(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered' AND account != 'noisy'"
        ),
        200
    );
    // The noisy account got its burst (50) and then 50/s at most.
    let noisy = delivered_of_account(&env, "noisy");
    let allowed = 50 + (first_run.as_secs_f64() * 50.0).ceil() as i64 + 1;
    assert!(
        noisy <= allowed,
        "{noisy} noisy deliveries in {first_run:?}, allowed {allowed}"
    );
    let json = stats(&env);
    assert_eq!(json["held_accounts"][0]["account"], "noisy", "{json}");
    assert!(
        env.query_i64("SELECT count(*) FROM deliveries WHERE reason = 'account_budget'") > 4000
    );

    run_until(
        &env,
        Duration::from_secs(400),
        "the noisy account drained",
        || delivered_of_account(&env, "noisy") == 5000,
    );
    // Over the whole drain the noisy account never beat its rate.
    let noisy_times: Vec<Instant> = rx
        .received()
        .iter()
        .filter(|r| r.header("cronpost-account") == "noisy")
        .map(|r| r.at)
        .collect();
    let span = *noisy_times.iter().max().unwrap() - *noisy_times.iter().min().unwrap();
    assert!(
        span >= Duration::from_secs_f64((5000.0 - 50.0) / 50.0 * 0.98),
        "5000 at 50/s took only {span:?}"
    );
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in rx.received() {
        *seen.entry(r.header("webhook-id").to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 5200);
    assert!(seen.values().all(|&n| n == 1));
}

fn retry_after_holds_a_saturated_endpoint_while_others_are_not_slowed(backend: Backend) {
    let rx = Receiver::start();
    let endpoints = endpoint("slow", &rx.url("/slow"), &["s"], "max_in_flight = 1")
        + &endpoint("fast", &rx.url("/fast"), &["f"], "");
    let env = Env::on(backend, "max_children = 4", &endpoints);
    rx.queue("/slow", &[Reply::RetryAfter(429, "2")]);
    env.enqueue_ndjson(&ndjson((0..5).map(|_| ("s".into(), "a".into(), 0))));
    env.enqueue_ndjson(&ndjson((0..20).map(|_| ("f".into(), "a".into(), 0))));

    env.run();

    let slow = rx.received_on("/slow");
    assert_eq!(slow.len(), 1, "one request, answered 429");
    let fast = rx.received_on("/fast");
    assert_eq!(fast.len(), 20, "the other endpoint drained in the same run");
    let held_from = slow[0].at;
    assert!(
        fast.iter()
            .all(|r| r.at < held_from + Duration::from_secs(2)),
        "not slowed by the held endpoint"
    );
    assert_eq!(
        env.query_i64("SELECT count(*) FROM deliveries WHERE reason = 'endpoint_saturated'"),
        5
    );
    let json = stats(&env);
    assert_eq!(json["saturated_endpoints"][0]["endpoint"], "slow", "{json}");
    assert!(
        env.ok(&["stats"])
            .contains("endpoint slow saturated, cool-down")
    );

    run_until(
        &env,
        Duration::from_secs(60),
        "the held deliveries delivered",
        || env.count_state("delivered") == 25,
    );
    let slow = rx.received_on("/slow");
    assert_eq!(slow.len(), 6);
    assert!(
        slow[1].at >= held_from + Duration::from_secs(2),
        "no request before Retry-After passed: {:?}",
        slow[1].at - held_from
    );
    assert!(
        stats(&env)["saturated_endpoints"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the breaker closed on success"
    );
}

fn an_endpoint_that_accepts_and_never_answers_is_held_after_slow_after_silences(backend: Backend) {
    let rx = Receiver::start();
    rx.set_default("/quiet", Reply::Hang);
    let endpoints = endpoint(
        "quiet",
        &rx.url("/quiet"),
        &["q"],
        "answer_window = \"100ms\"\nslow_after = 3\ncooldown_base = \"1h\"\ncooldown_cap = \"1h\"",
    ) + &endpoint("fast", &rx.url("/fast"), &["f"], "");
    let env = Env::on(backend, "max_children = 2", &endpoints);
    env.enqueue_ndjson(&ndjson((0..10).map(|_| ("q".into(), "a".into(), 0))));
    env.enqueue_ndjson(&ndjson((0..20).map(|_| ("f".into(), "a".into(), 0))));

    env.run();

    // Three silences in a row open the breaker; a second child may have
    // leased one more before the third was recorded.
    let quiet = rx.received_on("/quiet");
    assert!((3..=4).contains(&quiet.len()), "{} requests", quiet.len());
    assert_eq!(
        rx.received_on("/fast").len(),
        20,
        "the other endpoint flowed"
    );
    let held = env.query_i64(
        "SELECT count(*) FROM deliveries WHERE endpoint = 'quiet' AND state = 'delayed' AND reason = 'endpoint_saturated'",
    );
    assert_eq!(
        held as usize,
        10 - quiet.len(),
        "the rest are held, untried"
    );
    assert_eq!(
        env.query_i64(
            "SELECT count(*) FROM deliveries WHERE endpoint = 'quiet' AND state = 'delivered'"
        ) as usize,
        quiet.len(),
        "fire-and-forget: handed over"
    );
    let json = stats(&env);
    let health = &json["saturated_endpoints"][0];
    assert_eq!(health["endpoint"], "quiet", "{json}");
    assert!(
        health["last_error"]
            .as_str()
            .unwrap()
            .contains("3 times in a row (slow_after)"),
        "{json}"
    );
}

#[test]
fn max_in_flight_holds_across_two_concurrent_runs() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::Delayed(Duration::from_millis(200), 200));
    let env = Env::new(
        "max_children = 8",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "max_in_flight = 3\nanswer_window = \"2s\"",
        ),
    );
    env.enqueue_ndjson(&ndjson((0..30).map(|i| ("t".into(), format!("a{i}"), 0))));

    env.run_concurrently_until_delivered(2, 30, Duration::from_secs(120));
    assert_eq!(rx.received_on("/slow").len(), 30, "each delivered once");
    let max = rx.max_concurrency();
    assert!(max <= 3, "the receiver saw {max} requests at once");
    assert!(max >= 2, "runs did post concurrently ({max})");
    // Work held back by the cap costs at most one child that finds nothing
    // per look (a look after each 50 ms pause, shorter only when a delayed
    // delivery comes due sooner, none here; and a few on wake-ups), not
    // max_children each time: bounded by the run's length, whatever the
    // machine's speed (pauses only get longer under load).
    let runs = env
        .db()
        .prepare("SELECT found_nothing, finished_at - started_at FROM runs")
        .unwrap()
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(runs.len(), 2);
    for (empty, ms) in runs {
        assert!(
            empty <= 2 * ms / 50 + 8,
            "{empty} children found nothing in a run of {ms} ms"
        );
    }
}

fn a_down_endpoint_is_probed_once_per_cool_down_and_drains_when_back(backend: Backend) {
    let rx = Receiver::start();
    rx.set_default("/down", Reply::Status(503));
    let env = Env::on(
        backend,
        "max_children = 4",
        &endpoint(
            "down",
            &rx.url("/down"),
            &["t"],
            "cooldown_base = \"300ms\"\ncooldown_cap = \"300ms\"\nmax_attempts = 100\nbackoff_base = \"10ms\"\nbackoff_cap = \"10ms\"",
        ),
    );
    env.enqueue_ndjson(&ndjson((0..10).map(|i| ("t".into(), format!("a{i}"), 0))));

    run_until(&env, Duration::from_secs(60), "five probes", || {
        rx.received_on("/down").len() >= 8
    });
    // Every request the receiver saw is an attempt, finished (503) by now.
    let attempts: Vec<(i64, i64)> = env
        .query_rows("SELECT started_at, finished_at FROM attempts ORDER BY started_at")
        .iter()
        .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
        .collect();
    assert_eq!(attempts.len(), rx.received_on("/down").len());
    // The first wave was leased before the first 503's breaker was seen
    // (its finish is timed before its commit, so a lease up to a moment
    // after that time may still have read the breaker closed); after it,
    // the first probe starts a full cool-down after the answer that opened
    // the breaker (the wave's others, recorded later under load, only
    // lengthen it), each next one a full cool-down after the previous
    // probe's answer.
    let opened = attempts.iter().map(|a| a.1).min().unwrap();
    let (wave, probes): (Vec<&(i64, i64)>, Vec<_>) =
        attempts.iter().partition(|a| a.0 < opened + 50);
    assert!(wave.len() <= 8, "first wave: {wave:?}");
    assert!(probes.len() >= 3, "{attempts:?}");
    let mut last_answer = opened;
    for &(started, finished) in probes {
        assert!(
            started - last_answer >= 300,
            "a probe {} ms after the last answer",
            started - last_answer
        );
        last_answer = finished;
    }
    assert_eq!(env.count_state("dead"), 0);

    rx.set_default("/down", Reply::Status(200));
    run_until(&env, Duration::from_secs(60), "drained", || {
        env.count_state("delivered") == 10
    });
}

fn eligible_delayed_deliveries_are_not_starved_by_a_ready_backlog(backend: Backend) {
    for (share, expect_all) in [("0.2", true), ("0", false)] {
        let rx = Receiver::start();
        let env = Env::on(
            backend,
            &format!("max_children = 4\nmax_messages = 100\ndelayed_share = {share}"),
            &endpoint("hook", &rx.url("/hook"), &["t"], ""),
        );
        // Ten delayed messages, eligible in 300 ms, then a ready backlog of
        // higher priority larger than a run can drain.
        let delayed: String = (0..10)
            .map(|i| format!("{{\"topic\":\"t\",\"account\":\"late{i}\",\"payload\":{{}},\"delay\":\"300ms\"}}\n"))
            .collect();
        env.enqueue_ndjson(&delayed);
        env.run(); // routes them into the delayed queue; nothing is due yet
        assert_eq!(
            env.query_i64("SELECT count(*) FROM deliveries WHERE reason = 'scheduled'"),
            10
        );
        let eligible_at = env.query_i64("SELECT max(available_at) FROM messages");
        env.enqueue_ndjson(&ndjson(
            (0..300).map(|i| ("t".into(), format!("busy{}", i % 30), 10)),
        ));
        wait_until(
            Duration::from_secs(10),
            "the delayed messages are due",
            || cronpost::store::now_ms() > eligible_at,
        );

        env.run();

        let late = env.query_i64(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered' AND account LIKE 'late%'",
        );
        assert_eq!(env.count_state("delivered"), 100, "share {share}");
        if expect_all {
            assert_eq!(
                late, 10,
                "with delayed_share {share} every eligible delayed delivery went in the run"
            );
        } else {
            assert_eq!(late, 0, "with delayed_share 0 the ready backlog goes first");
        }
    }
}

fn budget_and_saturation_state_survive_between_runs(backend: Backend) {
    let rx = Receiver::start();
    rx.queue("/sat", &[Reply::RetryAfter(503, "30")]);
    let endpoints = endpoint("sat", &rx.url("/sat"), &["s"], "max_in_flight = 1")
        + &endpoint("budget", &rx.url("/budget"), &["b"], "");
    let env = Env::on(
        backend,
        "",
        &format!("[account_budget.overrides]\nslow = {{ rate = 0.2 }}\n\n{endpoints}"),
    );
    env.enqueue_ndjson(&ndjson([
        ("s".into(), "x".into(), 0),
        ("s".into(), "x".into(), 0),
    ]));
    env.enqueue_ndjson(&ndjson((0..3).map(|_| ("b".into(), "slow".into(), 0))));

    env.run();
    assert_eq!(rx.received_on("/sat").len(), 1);
    assert_eq!(rx.received_on("/budget").len(), 1);

    env.run();
    assert_eq!(
        rx.received_on("/sat").len(),
        1,
        "the second run honours the first run's cool-down"
    );
    assert_eq!(
        rx.received_on("/budget").len(),
        1,
        "and the account's budget"
    );
    let json = stats(&env);
    assert_eq!(json["saturated_endpoints"][0]["endpoint"], "sat");
    assert!(
        json["saturated_endpoints"][0]["cooldown_left_seconds"]
            .as_f64()
            .unwrap()
            > 20.0
    );
    assert_eq!(json["held_accounts"][0]["account"], "slow");
    assert_eq!(json["held_accounts"][0]["delayed"], 2);
}

#[test]
fn bad_saturation_settings_are_config_errors() {
    let rx = Receiver::start();
    let env = Env::new("", &endpoint("e", &rx.url("/e"), &["t"], ""));
    let good = std::fs::read_to_string(&env.config).unwrap();
    for (text, expected) in [
        (
            good.replace("[run]\n", "[run]\ndelayed_share = 2.0\n"),
            "run.delayed_share = 2",
        ),
        (
            format!("{good}\n[account_budget]\nrate = 0\n"),
            "account_budget.rate = 0",
        ),
        (
            format!("{good}\n[account_budget]\nburst = 5\n"),
            "account_budget.burst needs a account_budget.rate",
        ),
        (
            good.replace("secret", "max_in_flight = 0\nsecret"),
            "endpoints.e.max_in_flight = 0",
        ),
        (
            good.replace("secret", "rate = -1\nsecret"),
            "endpoints.e.rate = -1",
        ),
        (
            good.replace("secret", "slow_after = 0\nsecret"),
            "endpoints.e.slow_after = 0",
        ),
        (
            good.replace("secret", "mode = \"confirm\"\nslow_after = 3\nsecret"),
            "endpoints.e.slow_after applies to mode = \"fire_and_forget\" only",
        ),
        (
            good.replace("secret", "adaptive = \"yes\"\nsecret"),
            "endpoints.e.adaptive: invalid type",
        ),
    ] {
        env.write_config(&text);
        let out = env.cronpost(&["check-config"]);
        assert_eq!(out.status.code(), Some(78), "{expected}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{expected}: {}",
            stderr(&out)
        );
    }
}

/// A lingering run in the background, stopped (SIGTERM, then waited for)
/// when dropped.
struct Lingering(std::process::Child);

impl Lingering {
    fn start(env: &Env) -> Lingering {
        Lingering(
            env.command(&["run", "--linger"])
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// The times of the requests to `path` answered `status`.
fn answered(rx: &Receiver, path: &str, status: u16) -> Vec<Instant> {
    let mut at: Vec<Instant> = rx
        .received_on(path)
        .iter()
        .filter(|r| r.status == Some(status))
        .map(|r| r.at)
        .collect();
    at.sort();
    at
}

fn learned(env: &Env, endpoint: &str) -> Option<(f64, String)> {
    let rows = env.query_rows(&format!(
        "SELECT learned_rate, rate_reason FROM endpoint_health
         WHERE endpoint = '{endpoint}' AND learned_rate IS NOT NULL"
    ));
    rows.first().map(|r| (r[0].parse().unwrap(), r[1].clone()))
}

/// A receiver that answers 429 above 40 requests a second, then above 10:
/// the endpoint learns its rate from the 429s (and shows it), is driven
/// near each limit with few refusals, and the healthy endpoint beside it
/// drains first. Bounds are generous: the figures are in BENCHMARKS.md.
#[test]
fn a_rate_limited_endpoint_learns_its_limit_and_follows_it_down() {
    let rx = Receiver::start();
    rx.set_default("/limited", Reply::Limited(40));
    let env = Env::new(
        "max_children = 8\nmax_runtime = \"3m\"",
        &(endpoint("limited", &rx.url("/limited"), &["l"], "")
            + &endpoint("healthy", &rx.url("/healthy"), &["h"], "")),
    );
    env.prepend_config("metrics_file = \"metrics.prom\"\n");
    env.enqueue_ndjson(&ndjson((0..200).map(|_| ("l".into(), "a".into(), 0))));
    env.enqueue_ndjson(&ndjson((0..200).map(|_| ("h".into(), "a".into(), 0))));
    let run = Lingering::start(&env);
    wait_until(Duration::from_secs(60), "100 accepted at 40/s", || {
        answered(&rx, "/limited", 200).len() >= 100
    });
    rx.set_default("/limited", Reply::Limited(10));
    let dropped = Instant::now();
    let (at_40, _) = learned(&env, "limited").expect("a rate learned from the 429s");
    wait_until(
        Duration::from_secs(30),
        "the learned rate follows the drop",
        || learned(&env, "limited").is_some_and(|(rate, _)| rate <= 12.0),
    );
    let followed = dropped.elapsed();
    wait_until(Duration::from_secs(120), "all delivered", || {
        env.count_state("delivered") == 400
    });
    drop(run);

    let ok = answered(&rx, "/limited", 200);
    let refused = answered(&rx, "/limited", 429).len();
    assert_eq!(ok.len(), 200);
    // Few refusals: the breaker alone refused several a second each time
    // it flooded again after a cool-down.
    assert!(
        refused * 20 <= ok.len() + refused,
        "{refused} refused of {} requests",
        ok.len() + refused
    );
    // Near the first limit: learned from what it took, and the 100 in
    // less than what 30/s needs (a second of them was the first cool-down).
    assert!((30.0..=40.0).contains(&at_40), "learned {at_40}/s of 40");
    let first_hundred = ok[99] - ok[0];
    assert!(
        first_hundred < Duration::from_secs_f64(100.0 / 30.0 + 1.0),
        "100 at 40/s took {first_hundred:?}"
    );
    assert!(
        followed < Duration::from_secs(15),
        "followed in {followed:?}"
    );
    // The healthy endpoint was not held back: it was done long before.
    let healthy = answered(&rx, "/healthy", 200);
    assert_eq!(healthy.len(), 200);
    assert!(healthy[199] < ok[199]);
    // Shown: stats, the view, the metrics.
    let shown = env.ok(&["stats"]);
    assert!(shown.contains("endpoint limited learned rate"), "{shown}");
    let json = stats(&env);
    assert_eq!(json["learned_rates"][0]["endpoint"], "limited", "{json}");
    let view = env.query_rows(
        "SELECT endpoint, learned_rate IS NOT NULL, rate_reason IS NOT NULL FROM endpoint_status ORDER BY endpoint",
    );
    assert_eq!(view[1], ["limited", "1", "1"], "{view:?}");
    let metrics = std::fs::read_to_string(env.dir.path().join("metrics.prom")).unwrap();
    assert!(
        metrics.contains("cronpost_endpoint_learned_rate{endpoint=\"limited\",reason=\""),
        "{metrics}"
    );
}

/// A confirm-mode receiver that answers more and more slowly as it gets
/// busier: the rising answer times lower the endpoint's rate (reason
/// slow_answers), and everything is delivered.
#[test]
fn answers_slowing_down_under_load_lower_a_confirm_mode_endpoint_rate() {
    let rx = Receiver::start();
    rx.set_default("/slow", Reply::SlowerAbove(10));
    let env = Env::new(
        "max_children = 8\nmax_runtime = \"3m\"",
        &endpoint(
            "slow",
            &rx.url("/slow"),
            &["t"],
            "mode = \"confirm\"\ntimeout = \"10s\"",
        ),
    );
    env.enqueue_ndjson(&ndjson((0..150).map(|_| ("t".into(), "a".into(), 0))));
    let run = Lingering::start(&env);
    // Seen as it happens: the next step up would say `increase`.
    wait_until(
        Duration::from_secs(60),
        "a rate lowered on slow answers",
        || learned(&env, "slow").is_some_and(|(_, why)| why == "slow_answers"),
    );
    wait_until(Duration::from_secs(120), "all delivered", || {
        env.count_state("delivered") == 150
    });
    drop(run);
    let refused = rx
        .received_on("/slow")
        .iter()
        .filter(|r| r.status != Some(200))
        .count();
    assert_eq!(refused, 0, "it never refused: only its answers slowed");
}

/// With `adaptive = false` an endpoint learns nothing: 429s open its
/// breaker as before, and everything is delivered.
#[test]
fn an_endpoint_that_does_not_adapt_learns_nothing() {
    let rx = Receiver::start();
    rx.set_default("/fixed", Reply::Limited(20));
    let env = Env::new(
        "max_children = 8",
        &endpoint("fixed", &rx.url("/fixed"), &["t"], "adaptive = false"),
    );
    env.enqueue_ndjson(&ndjson((0..60).map(|_| ("t".into(), "a".into(), 0))));
    run_until(&env, Duration::from_secs(60), "all delivered", || {
        env.count_state("delivered") == 60
    });
    assert!(!answered(&rx, "/fixed", 429).is_empty(), "it was refused");
    assert_eq!(learned(&env, "fixed"), None);
}
