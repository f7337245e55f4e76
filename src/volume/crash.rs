//! Test points for recovery and concurrency tests, compiled only with the `test-hooks` cargo
//! feature (which hack/test enables); the production binary carries none and a point costs
//! nothing. When `SEALVOL_CRASH_AT` names a point, the process aborts there, as a `kill -9`
//! would, so a test can restart the driver and check that the call can be repeated. When
//! `SEALVOL_PAUSE_AT=point:millis` names it, the call sleeps there while holding its volume's
//! guard, so a test can collide with it deterministically.

#[cfg(feature = "test-hooks")]
pub(crate) fn point(name: &str) {
    use std::sync::OnceLock;
    use std::time::Duration;

    const CRASH_ENV: &str = "SEALVOL_CRASH_AT";
    const PAUSE_ENV: &str = "SEALVOL_PAUSE_AT";

    struct Points {
        crash: Option<String>,
        pause: Option<(String, Duration)>,
    }

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

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn point(_name: &str) {}
