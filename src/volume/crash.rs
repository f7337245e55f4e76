//! Test points for recovery and concurrency tests. When `SEALVOL_CRASH_AT` names a point, the
//! process aborts there, as a `kill -9` would, so a test can restart the driver and check that
//! the call can be repeated. When `SEALVOL_PAUSE_AT=point:millis` names it, the call sleeps
//! there while holding its volume's guard, so a test can collide with it deterministically.
//! Unset in production, a point costs one comparison.

use std::sync::OnceLock;
use std::time::Duration;

pub(crate) const CRASH_ENV: &str = "SEALVOL_CRASH_AT";
pub(crate) const PAUSE_ENV: &str = "SEALVOL_PAUSE_AT";

struct Points {
    crash: Option<String>,
    pause: Option<(String, Duration)>,
}

pub(crate) fn point(name: &str) {
    static POINTS: OnceLock<Points> = OnceLock::new();
    let points = POINTS.get_or_init(|| Points {
        crash: std::env::var(CRASH_ENV).ok(),
        pause: std::env::var(PAUSE_ENV).ok().and_then(|v| {
            let (point, ms) = v.split_once(':')?;
            Some((point.to_string(), Duration::from_millis(ms.parse().ok()?)))
        }),
    });
    if points.crash.as_deref() == Some(name) {
        eprintln!("{CRASH_ENV}={name}: aborting");
        std::process::abort();
    }
    if let Some((point, pause)) = &points.pause
        && point == name
    {
        std::thread::sleep(*pause);
    }
}
