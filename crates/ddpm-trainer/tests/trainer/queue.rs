//! Two daemons on one queue never run the same run.

use std::time::Duration;

use ddpm_registry::RunStatus;
use ddpm_testkit::both_backends;

use crate::helpers::{expected_steps, micro_config, TestEnv};

const RUNS: usize = 4;

async fn two_daemons_never_run_the_same_run(env: TestEnv) {
    let config = env.write_config("run.toml", &micro_config(&env.dataset, 40, 10, 40));
    let mut ids = Vec::new();
    for _ in 0..RUNS {
        ids.push(env.submit(&config).await);
    }
    let args = ["daemon", "--once", "--poll-interval", "100ms"];
    let a = env.spawn("a", &args);
    let b = env.spawn("b", &args);
    let limit = Duration::from_secs(300);
    assert!(env.wait(a, "a", limit).await.success(), "{}", env.log("a"));
    assert!(env.wait(b, "b", limit).await.success(), "{}", env.log("b"));
    let claimed = |log: String| -> Vec<i64> {
        log.lines()
            .filter(|l| l.contains("run claimed"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["span"]["id"].as_i64())
            .collect()
    };
    let (from_a, from_b) = (claimed(env.log("a")), claimed(env.log("b")));
    assert_eq!(
        from_a.len() + from_b.len(),
        RUNS,
        "a: {from_a:?}, b: {from_b:?}"
    );
    assert!(
        from_a.iter().all(|id| !from_b.contains(id)),
        "a: {from_a:?}, b: {from_b:?}"
    );
    for id in ids {
        let run = env.run(id).await;
        assert_eq!(
            (run.status, run.attempts),
            (RunStatus::Completed, 1),
            "run {id}"
        );
        assert_eq!(env.metric_steps(id).await, expected_steps(40, 10));
    }
}

both_backends!(crate::helpers::with_env; two_daemons_never_run_the_same_run);
