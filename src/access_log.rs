//! The access log, off the hot path: a worker formats one line per request and hands it to a
//! dedicated writer thread through a bounded queue. A full queue drops the line and counts it;
//! a worker never waits for the log, whatever the sink does (a slow disk, a full pipe).
//!
//! Formats (`server.access_log_format`): `text` (one `key=value` line, as before) or `json` (one
//! JSON object per line). Sink (`server.access_log_path`): a file, appended to, or stderr.

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime};

/// The fields every JSON line carries (besides `ts`).
pub const FIELDS: [&str; 9] = [
    "method",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "cache",
    "upstream",
    "request_id",
    "client",
];

/// Lines the queue holds before new ones are dropped.
pub const QUEUE_LINES: usize = 16 * 1024;
/// The writer flushes at least this often while lines keep coming.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Seconds since the Unix epoch, with milliseconds.
    pub ts: f64,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    pub duration_ms: u64,
    /// RFC 9211 `Cache-Status`, `-` when the cache was not involved.
    pub cache: &'a str,
    /// The last origin server tried, `-` if none.
    pub upstream: &'a str,
    pub request_id: &'a str,
    pub client: &'a str,
}

impl Entry<'_> {
    pub fn now() -> f64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| (d.as_millis() as f64) / 1000.0)
            .unwrap_or(0.0)
    }

    fn line(&self, format: Format) -> String {
        match format {
            Format::Json => {
                let mut s = serde_json::to_string(self).unwrap_or_default();
                s.push('\n');
                s
            }
            Format::Text => format!(
                "{:.3} {} {} {} bytes={} dur_ms={} cache={:?} upstream={} rid={} client={}\n",
                self.ts,
                self.method,
                self.path,
                self.status,
                self.bytes,
                self.duration_ms,
                self.cache,
                self.upstream,
                self.request_id,
                self.client
            ),
        }
    }
}

/// Where lines go.
enum Sink {
    Stderr(io::Stderr),
    File(BufWriter<File>),
}

impl Sink {
    fn open(path: Option<&Path>) -> io::Result<Sink> {
        Ok(match path {
            None => Sink::Stderr(io::stderr()),
            Some(p) => Sink::File(BufWriter::with_capacity(
                64 * 1024,
                OpenOptions::new().create(true).append(true).open(p)?,
            )),
        })
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Sink::Stderr(e) => e.write_all(line.as_bytes()),
            Sink::File(f) => f.write_all(line.as_bytes()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stderr(e) => e.flush(),
            Sink::File(f) => f.flush(),
        }
    }
}

/// The handle workers log through. Cheap to share (`Arc`).
///
/// The writer thread starts with the first line, not at construction: Pingora's daemon mode
/// forks after the server is built, and a thread started before the fork would not exist in
/// the child. The sink is opened at construction (so a bad path fails at start, and the open
/// file survives the fork).
pub struct AccessLog {
    format: Format,
    tx: SyncSender<String>,
    /// The receiving end and the sink, until the writer thread takes them.
    pending: Mutex<Option<(Receiver<String>, Sink)>>,
    started: Once,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    pub fn start(format: Format, path: Option<PathBuf>) -> io::Result<AccessLog> {
        Self::start_with_queue(format, path, QUEUE_LINES)
    }

    pub fn start_with_queue(
        format: Format,
        path: Option<PathBuf>,
        queue: usize,
    ) -> io::Result<AccessLog> {
        let sink = Sink::open(path.as_deref())?;
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        Ok(AccessLog {
            format,
            tx,
            pending: Mutex::new(Some((rx, sink))),
            started: Once::new(),
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    fn ensure_writer(&self) {
        self.started.call_once(|| {
            let pending = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some((rx, sink)) = pending {
                let spawned = std::thread::Builder::new()
                    .name("access-log".into())
                    .spawn(move || write_loop(rx, sink));
                if let Err(e) = spawned {
                    log::warn!("access log: cannot start the writer thread: {e}");
                }
            }
        });
    }

    /// Queue one line; never blocks. A full queue drops it (counted in [`AccessLog::dropped`]).
    pub fn log(&self, entry: &Entry<'_>) {
        self.ensure_writer();
        match self.tx.try_send(entry.line(self.format)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

fn write_loop(rx: Receiver<String>, mut sink: Sink) {
    let mut failing = false;
    let mut dirty = false;
    loop {
        let line = match rx.recv_timeout(FLUSH_EVERY) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                if dirty {
                    let _ = sink.flush();
                    dirty = false;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match sink.write_line(&line) {
            Ok(()) => {
                failing = false;
                dirty = true;
            }
            Err(e) if !failing => {
                // Once per failing spell, not per line.
                log::warn!("access log: write failed: {e}");
                failing = true;
            }
            Err(_) => {}
        }
    }
    let _ = sink.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            ts: 1.5,
            method: "GET",
            path: "/a \"quoted\"\npath",
            status: 206,
            bytes: 4096,
            duration_ms: 3,
            cache: "edgeslice; hit",
            upstream: "-",
            request_id: "r1",
            client: "127.0.0.2",
        }
    }

    #[test]
    fn json_lines_carry_every_field_and_escape_input() {
        let line = entry().line(Format::Json);
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line:?}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for k in FIELDS {
            assert!(v.get(k).is_some(), "{k} in {line}");
        }
        assert_eq!(v["path"], "/a \"quoted\"\npath");
        assert_eq!(v["status"], 206);
    }

    #[test]
    fn text_lines_keep_the_old_shape() {
        let line = entry().line(Format::Text);
        assert!(line.contains("GET /a") && line.contains("rid=r1") && line.contains("bytes=4096"));
    }

    #[test]
    fn a_blocked_sink_drops_lines_instead_of_waiting() {
        // A pipe nobody reads: the writer thread blocks once the pipe buffer is full.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Keep a reader open (so opening for writing does not block) that never reads.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags_nonblock()
            .open(&fifo)
            .unwrap();
        let log = AccessLog::start_with_queue(Format::Json, Some(fifo.clone()), 64).unwrap();
        for _ in 0..100_000 {
            log.log(&entry());
        }
        // 100k lines, far beyond the pipe and the queue: the loop ended (a blocking log would
        // hang here), and what did not fit was dropped and counted.
        assert!(log.dropped() > 0);
    }

    trait NonBlock {
        fn custom_flags_nonblock(&mut self) -> &mut Self;
    }
    impl NonBlock for std::fs::OpenOptions {
        fn custom_flags_nonblock(&mut self) -> &mut Self {
            use std::os::unix::fs::OpenOptionsExt;
            self.custom_flags(libc::O_NONBLOCK)
        }
    }
}
