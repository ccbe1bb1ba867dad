//! Optional per-op wall-time accounting: `profile::enable()`, run, `profile::report()`. Each op opens
//! a `profile::scope("name")`; when profiling is off that costs one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Turns the accounting on for the whole process (it cannot be turned off; [`report`] empties the
/// table). Scopes opened before the call are not counted.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// An open timing scope: on drop, the time since [`scope`] is added to its name's row (when profiling
/// was on at the opening).
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

/// Opens a scope named `name`; keep it alive (`let _p = profile::scope(..)`, not `let _ = ..`) for the
/// span to measure. Scopes with the same name add up; nested scopes are each counted in full.
pub fn scope(name: &'static str) -> Scope {
    Scope { name, start: ENABLED.load(Ordering::Relaxed).then(Instant::now) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            let e = t.entry(self.name).or_insert((0.0, 0));
            e.0 += start.elapsed().as_secs_f64();
            e.1 += 1;
        }
    }
}

/// (op, seconds, calls), most expensive first; resets the table.
pub fn report() -> Vec<(&'static str, f64, u64)> {
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = t.iter().map(|(k, v)| (*k, v.0, v.1)).collect();
    t.clear();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows
}
