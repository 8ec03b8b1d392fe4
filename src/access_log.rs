//! The access log, off the hot path: a worker formats one line per request and hands it to a
//! dedicated writer thread through a queue bounded in lines and in bytes (a line carries the
//! request path, up to `server.max_uri_size`: 16,384 lines of 8 KiB paths would be 128 MiB). A
//! full queue drops the line and counts it; a worker never waits for the log, whatever the
//! sink does (a slow disk, a full pipe).
//!
//! Formats (`server.access_log_format`): `text` (one `key=value` line, as before) or `json` (one
//! JSON object per line). Sink (`server.access_log_path`): a file, appended to, or stderr.
//! On SIGUSR1 the file is opened again by its path, for logrotate.

use serde::Serialize;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime};

/// The fields every JSON line carries (besides `ts`).
pub const FIELDS: [&str; 10] = [
    "method",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "cache",
    "upstream",
    "request_id",
    "client",
    "protocol",
];

/// Lines the queue holds before new ones are dropped.
pub const QUEUE_LINES: usize = 16 * 1024;
/// ... and bytes of lines (their allocations): 16,384 lines of 256 bytes, or 512 lines with
/// paths of 8 KiB.
pub const QUEUE_BYTES: u64 = 4 << 20;
/// The writer flushes at least this often while lines keep coming.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How often the writer looks at the queue while lines are coming (it holds
/// `QUEUE_LINES`: 800,000 lines a second before any is dropped).
const POLL_EVERY: Duration = Duration::from_millis(20);
/// Empty looks (a quiet second) before the writer blocks on the queue instead.
const IDLE_POLLS: u32 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// One request, as logged. Built from borrowed and plain values, so logging a request allocates
/// only its line.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Milliseconds since the Unix epoch; written as seconds with three decimals (`ts`).
    #[serde(rename = "ts", serialize_with = "seconds")]
    pub ts_ms: u64,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    pub duration_ms: u64,
    /// RFC 9211 `Cache-Status`, `-` when the cache was not involved.
    pub cache: &'a str,
    /// The last origin server tried, `-` if none.
    #[serde(serialize_with = "or_dash")]
    pub upstream: Option<SocketAddr>,
    pub request_id: &'a str,
    /// The client's address, `unknown` if it has none (a Unix socket).
    #[serde(serialize_with = "or_unknown")]
    pub client: Option<IpAddr>,
    /// `http1` or `h2`.
    #[serde(serialize_with = "protocol")]
    pub protocol: crate::conn::Protocol,
}

impl Entry<'_> {
    pub fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// The line, newline included, written into one buffer sized for it up front (no
    /// float formatting, no intermediate strings).
    fn line(&self, format: Format) -> String {
        let mut out = String::with_capacity(192 + self.path.len() + self.request_id.len());
        match format {
            Format::Json => {
                // serde_json writes UTF-8 only: `from_utf8` cannot fail.
                let mut buf = std::mem::take(&mut out).into_bytes();
                if serde_json::to_writer(&mut buf, self).is_ok() {
                    buf.push(b'\n');
                    out = String::from_utf8(buf).unwrap_or_default();
                }
            }
            Format::Text => {
                let _ = writeln!(
                    out,
                    "{}.{:03} {} {} {} bytes={} dur_ms={} cache={:?} upstream={} rid={} client={} protocol={}",
                    self.ts_ms / 1000,
                    self.ts_ms % 1000,
                    self.method,
                    self.path,
                    self.status,
                    self.bytes,
                    self.duration_ms,
                    self.cache,
                    Dash(self.upstream.as_ref(), "-"),
                    self.request_id,
                    Dash(self.client.as_ref(), "unknown"),
                    self.protocol.as_str(),
                );
            }
        }
        out
    }
}

/// An optional value, or a placeholder when absent.
struct Dash<'a, T>(Option<&'a T>, &'static str);

impl<T: std::fmt::Display> std::fmt::Display for Dash<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str(self.1),
        }
    }
}

fn seconds<S: serde::Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(*ms as f64 / 1000.0)
}

fn or_dash<S: serde::Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&Dash(v.as_ref(), "-"))
}

fn protocol<S: serde::Serializer>(p: &crate::conn::Protocol, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.as_str())
}

fn or_unknown<S: serde::Serializer>(v: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&Dash(v.as_ref(), "unknown"))
}

/// Where lines go.
enum Sink {
    /// Buffered like a file (whole lines per write, flushed by the writer's clock): one
    /// `write` per line to stderr cost 4 % of a worker's time on small hits.
    Stderr(BufWriter<io::Stderr>),
    File(BufWriter<File>),
}

impl Sink {
    fn open(path: Option<&Path>) -> io::Result<Sink> {
        Ok(match path {
            None => Sink::Stderr(BufWriter::with_capacity(64 * 1024, io::stderr())),
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
    pending: Mutex<Option<(Receiver<String>, Writer)>>,
    started: Once,
    dropped: Arc<AtomicU64>,
    /// Bytes of the lines queued and not yet taken by the writer, at most `max_queued`.
    queued: Arc<AtomicU64>,
    max_queued: u64,
    /// Set to have the writer reopen its file (SIGUSR1, after logrotate moved it).
    reopen: Arc<AtomicBool>,
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
        Self::start_with_limits(format, path, queue, QUEUE_BYTES)
    }

    /// A log whose queue holds at most `lines` lines and `bytes` bytes of them.
    pub fn start_with_limits(
        format: Format,
        path: Option<PathBuf>,
        lines: usize,
        bytes: u64,
    ) -> io::Result<AccessLog> {
        let sink = Sink::open(path.as_deref())?;
        let (tx, rx) = mpsc::sync_channel(lines.max(1));
        Ok(AccessLog {
            format,
            tx,
            pending: Mutex::new(Some((rx, Writer { sink, path }))),
            started: Once::new(),
            dropped: Arc::new(AtomicU64::new(0)),
            queued: Arc::new(AtomicU64::new(0)),
            max_queued: bytes,
            reopen: Arc::new(AtomicBool::new(false)),
        })
    }

    fn ensure_writer(&self) {
        self.started.call_once(|| {
            let pending = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some((rx, writer)) = pending {
                let reopen = self.reopen.clone();
                let queued = self.queued.clone();
                let spawned = std::thread::Builder::new()
                    .name("access-log".into())
                    .spawn(move || write_loop(rx, writer, &reopen, &queued));
                if let Err(e) = spawned {
                    log::warn!("access log: cannot start the writer thread: {e}");
                }
            }
        });
    }

    /// Queue one line; never blocks. A full queue (in lines or in bytes) drops it (counted in
    /// [`AccessLog::dropped`]).
    pub fn log(&self, entry: &Entry<'_>) {
        self.ensure_writer();
        let line = entry.line(self.format);
        let weight = line_weight(&line);
        let before = self.queued.fetch_add(weight, Ordering::AcqRel);
        if before.saturating_add(weight) > self.max_queued {
            self.queued.fetch_sub(weight, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(weight, Ordering::AcqRel);
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Bytes of lines waiting for the writer.
    pub fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The flag that has the writer reopen its file: set it on SIGUSR1.
    pub fn reopen_flag(&self) -> Arc<AtomicBool> {
        self.reopen.clone()
    }

    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

/// The sink and where it was opened, to open it again.
struct Writer {
    sink: Sink,
    path: Option<PathBuf>,
}

impl Writer {
    /// Flush and open the file again by its path (logrotate moved the old one away). On failure
    /// the old file is kept.
    fn reopen(&mut self) {
        let Some(path) = self.path.as_deref() else {
            return;
        };
        let _ = self.sink.flush();
        match Sink::open(Some(path)) {
            Ok(sink) => {
                self.sink = sink;
                log::info!("access log: reopened {}", path.display());
            }
            Err(e) => log::warn!(
                "access log: cannot reopen {}: {e}; still writing to the old file",
                path.display()
            ),
        }
    }
}

/// What a queued line holds: its buffer.
fn line_weight(line: &String) -> u64 {
    line.capacity() as u64
}

fn write_loop(rx: Receiver<String>, mut writer: Writer, reopen: &AtomicBool, queued: &AtomicU64) {
    let mut failing = false;
    // Since when written lines wait in the buffer.
    let mut dirty: Option<std::time::Instant> = None;
    let mut idle_polls = 0;
    loop {
        if reopen.swap(false, Ordering::AcqRel) {
            writer.reopen();
            dirty = None;
        }
        let sink = &mut writer.sink;
        if dirty.is_some_and(|since| since.elapsed() >= FLUSH_EVERY) {
            let _ = sink.flush();
            dirty = None;
        }
        // Under traffic the queue is drained by polling, never by blocking on it: a worker's
        // `try_send` then never has to wake this thread (a futex call per request). Only after
        // a quiet spell does the writer block until the next line.
        let line = match rx.try_recv() {
            Ok(l) => {
                idle_polls = 0;
                l
            }
            Err(TryRecvError::Empty) if idle_polls < IDLE_POLLS => {
                idle_polls += 1;
                if dirty.take().is_some() {
                    let _ = sink.flush();
                }
                std::thread::sleep(POLL_EVERY);
                continue;
            }
            Err(TryRecvError::Empty) => match rx.recv_timeout(FLUSH_EVERY) {
                Ok(l) => {
                    idle_polls = 0;
                    l
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            },
            Err(TryRecvError::Disconnected) => break,
        };
        let written = sink.write_line(&line);
        queued.fetch_sub(line_weight(&line), Ordering::AcqRel);
        drop(line);
        match written {
            Ok(()) => {
                failing = false;
                dirty.get_or_insert_with(std::time::Instant::now);
            }
            Err(e) if !failing => {
                // Once per failing spell, not per line.
                log::warn!("access log: write failed: {e}");
                failing = true;
            }
            Err(_) => {}
        }
    }
    let _ = writer.sink.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            ts_ms: 1500,
            method: "GET",
            path: "/a \"quoted\"\npath",
            status: 206,
            bytes: 4096,
            duration_ms: 3,
            cache: "edgeslice; hit",
            upstream: None,
            request_id: "r1",
            client: Some(IpAddr::from([127, 0, 0, 2])),
            protocol: crate::conn::Protocol::Http1,
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
        assert!(line.starts_with("1.500 GET "), "{line}");
        assert!(
            line.ends_with(" upstream=- rid=r1 client=127.0.0.2 protocol=http1\n"),
            "{line}"
        );
        let e = Entry {
            ts_ms: 1_700_000_000_007,
            upstream: Some("10.0.0.1:8080".parse().unwrap()),
            client: None,
            protocol: crate::conn::Protocol::H2,
            ..entry()
        };
        let line = e.line(Format::Text);
        assert!(line.starts_with("1700000000.007 "), "{line}");
        assert!(
            line.ends_with(" upstream=10.0.0.1:8080 rid=r1 client=unknown protocol=h2\n"),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&e.line(Format::Json)).unwrap();
        assert_eq!(v["ts"], 1_700_000_000.007);
        assert_eq!(v["upstream"], "10.0.0.1:8080");
        assert_eq!(v["client"], "unknown");
        assert_eq!(v["protocol"], "h2");
    }

    /// A named pipe with a reader kept open (so opening it for writing does not block) that
    /// never reads: its directory, its path and the reader.
    fn unread_pipe() -> (tempfile::TempDir, std::path::PathBuf, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags_nonblock()
            .open(&fifo)
            .unwrap();
        (dir, fifo, reader)
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_too() {
        // A pipe nobody reads, as below: whatever does not fit is dropped.
        let (_dir, fifo, _reader) = unread_pipe();
        // Room for 10,000 lines, but only 1 MiB: lines with 8 KiB paths.
        let log = AccessLog::start_with_limits(Format::Text, Some(fifo.clone()), 10_000, 1 << 20)
            .unwrap();
        let path = format!("/{}", "p".repeat(8192));
        for _ in 0..5_000 {
            log.log(&Entry {
                path: &path,
                ..entry()
            });
        }
        assert!(log.queued_bytes() <= 1 << 20, "{}", log.queued_bytes());
        assert!(log.dropped() > 4_000, "{} dropped", log.dropped());
    }

    #[test]
    fn a_blocked_sink_drops_lines_instead_of_waiting() {
        // A pipe nobody reads: the writer thread blocks once the pipe buffer is full.
        let (_dir, fifo, _reader) = unread_pipe();
        let log = AccessLog::start_with_queue(Format::Json, Some(fifo.clone()), 64).unwrap();
        for _ in 0..100_000 {
            log.log(&entry());
        }
        // 100k lines, far beyond the pipe and the queue: the loop ended (a blocking log would
        // hang here), and what did not fit was dropped and counted.
        assert!(log.dropped() > 0);
    }

    #[test]
    fn lines_reach_the_file_while_traffic_never_pauses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(Format::Text, Some(path.clone())).unwrap();
        let start = std::time::Instant::now();
        // A line every 20 ms: the writer never sees a pause as long as FLUSH_EVERY.
        while start.elapsed() < FLUSH_EVERY * 4 {
            log.log(&entry());
            std::thread::sleep(Duration::from_millis(20));
            if std::fs::read_to_string(&path).is_ok_and(|t| !t.is_empty()) {
                return;
            }
        }
        panic!(
            "nothing flushed within {:?} of steady traffic",
            FLUSH_EVERY * 4
        );
    }

    #[test]
    fn reopen_starts_a_new_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let moved = dir.path().join("access.log.1");
        let log = AccessLog::start(Format::Text, Some(path.clone())).unwrap();
        log.log(&entry());
        let wait_for = |p: &std::path::Path| {
            let start = std::time::Instant::now();
            while !std::fs::read_to_string(p).is_ok_and(|t| !t.is_empty()) {
                assert!(start.elapsed() < Duration::from_secs(5), "{}", p.display());
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_for(&path);
        std::fs::rename(&path, &moved).unwrap();
        log.reopen_flag().store(true, Ordering::Release);
        // The writer notices within one FLUSH_EVERY.
        std::thread::sleep(FLUSH_EVERY * 2);
        log.log(&entry());
        wait_for(&path);
        let entries = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .unwrap()
                .matches("rid=r1")
                .count()
        };
        assert_eq!(entries(&moved), 1);
        assert_eq!(entries(&path), 1);
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
