//! Crash points for recovery tests: when `SEALVOL_CRASH_AT` names a point, the process aborts
//! there, as a `kill -9` would, so a test can restart the driver and check that the call can
//! be repeated. Unset in production, a point costs one comparison.

use std::sync::OnceLock;

pub(crate) const ENV: &str = "SEALVOL_CRASH_AT";

pub(crate) fn point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT.get_or_init(|| std::env::var(ENV).ok()).as_deref() == Some(name) {
        eprintln!("{ENV}={name}: aborting");
        std::process::abort();
    }
}
