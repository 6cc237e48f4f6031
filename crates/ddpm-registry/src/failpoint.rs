//! Named fault-injection points, for the trainer's fault suite (`tests/trainer/fault_suite` in
//! `ddpm-trainer`): a process built with the `failpoints` feature reads
//! `DDPM_FAILPOINTS=<name>=kill@<n>[,…]` and SIGKILLs itself the n-th time it passes
//! `<name>` (the first time without `@<n>`). Without the feature [`hit`] is an empty
//! inline function, and the variable means nothing: release builds cannot be told to
//! kill themselves.
//!
//! The points sit where a crash is most awkward: between a temp file and its rename,
//! between a durable file and its registration, between the two registrations of a
//! checkpoint, between a retention row and its file, and after a step.

/// Passes the point `name` (see the module doc).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    imp::hit(name)
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    /// The variable the points are read from.
    const VAR: &str = "DDPM_FAILPOINTS";

    struct Point {
        /// The pass that kills (1-based).
        at: u64,
        passes: AtomicU64,
    }

    fn points() -> &'static HashMap<String, Point> {
        static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();
        POINTS.get_or_init(|| parse(&std::env::var(VAR).unwrap_or_default()))
    }

    fn parse(spec: &str) -> HashMap<String, Point> {
        let mut points = HashMap::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, action) = entry
                .split_once('=')
                .unwrap_or_else(|| panic!("{VAR}: {entry:?} is not <name>=kill[@n]"));
            let at = match action.split_once('@') {
                Some(("kill", n)) => n
                    .parse()
                    .unwrap_or_else(|_| panic!("{VAR}: {entry:?}: bad pass number")),
                None if action == "kill" => 1,
                _ => panic!("{VAR}: {entry:?}: the only action is kill[@n]"),
            };
            let passes = AtomicU64::new(0);
            points.insert(name.to_owned(), Point { at, passes });
        }
        points
    }

    pub fn hit(name: &str) {
        let Some(point) = points().get(name) else {
            return;
        };
        if point.passes.fetch_add(1, Ordering::SeqCst) + 1 != point.at {
            return;
        }
        eprintln!("failpoint {name}: pass {}: SIGKILL", point.at);
        // A real SIGKILL, as the kernel's OOM killer or `docker kill` sends it: no
        // destructor, no flush, no signal handler runs.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn specs_parse() {
            let points = super::parse("a=kill, b.c=kill@3");
            assert_eq!(points["a"].at, 1);
            assert_eq!(points["b.c"].at, 3);
            assert!(super::parse("").is_empty());
        }
    }
}
