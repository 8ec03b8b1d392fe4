//! The process logger: `env_logger` (`RUST_LOG`, default `info`) behind a filter that moves
//! lines an operator cannot act on down to `debug`.
//!
//! Such a line is Pingora's "failed to acquire reusable stream" (pingora-core's connector, at
//! ERROR): a pooled origin connection was taken for reuse while the pool's idle watcher still
//! held it, so the request opens a new connection instead. Nothing failed and nothing can be
//! done about it, yet a soak logged it 1,426 times (issue 21). Filtering here rather than in
//! the vendored pingora-core keeps that patch to its one change (vendor/README.md).
//!
//! Must never: allocate or format on the way (the message is compared as a static string), or
//! drop any other line.

use log::{Level, Log, Metadata, Record};

/// Lines demoted to `debug`: (target prefix, exact message).
const DEMOTED: &[(&str, &str)] = &[(
    "pingora_core::connectors",
    "failed to acquire reusable stream",
)];

/// Whether `record` is one of [`DEMOTED`].
fn demoted(record: &Record<'_>) -> bool {
    record.level() <= Level::Warn
        && record.args().as_str().is_some_and(|message| {
            DEMOTED
                .iter()
                .any(|(target, m)| *m == message && record.target().starts_with(target))
        })
}

/// A logger passing every record to `inner`, those of [`DEMOTED`] at `debug`.
pub struct DemoteNoise<L> {
    inner: L,
}

impl<L: Log> DemoteNoise<L> {
    pub fn new(inner: L) -> DemoteNoise<L> {
        DemoteNoise { inner }
    }
}

impl<L: Log> Log for DemoteNoise<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !demoted(record) {
            self.inner.log(record);
            return;
        }
        let debug = Record::builder()
            .args(*record.args())
            .level(Level::Debug)
            .target(record.target())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build();
        if self.inner.enabled(debug.metadata()) {
            self.inner.log(&debug);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Install the process logger: `RUST_LOG` (default `info`), with [`DemoteNoise`].
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(DemoteNoise::new(inner))).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what reaches it, at `info` and up (the default).
    struct Recorder {
        lines: Mutex<Vec<(Level, String, String)>>,
        max: Level,
    }

    impl Log for Recorder {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            m.level() <= self.max
        }
        fn log(&self, r: &Record<'_>) {
            if self.enabled(r.metadata()) {
                self.lines.lock().unwrap().push((
                    r.level(),
                    r.target().to_string(),
                    r.args().to_string(),
                ));
            }
        }
        fn flush(&self) {}
    }

    fn emit(logger: &dyn Log, level: Level, target: &str, args: std::fmt::Arguments<'_>) {
        logger.log(
            &Record::builder()
                .level(level)
                .target(target)
                .args(args)
                .build(),
        );
    }

    fn lines(max: Level) -> Vec<(Level, String, String)> {
        let logger = DemoteNoise::new(Recorder {
            lines: Mutex::new(Vec::new()),
            max,
        });
        // As pingora-core's connector emits it (`error!("failed to acquire reusable stream")`).
        emit(
            &logger,
            Level::Error,
            "pingora_core::connectors",
            format_args!("failed to acquire reusable stream"),
        );
        // Other errors, of that target and of others, pass untouched.
        let n = 3;
        emit(
            &logger,
            Level::Error,
            "pingora_core::connectors",
            format_args!("failed to connect to {n} peers"),
        );
        emit(
            &logger,
            Level::Error,
            "edgeslice::cache",
            format_args!("failed to acquire reusable stream"),
        );
        logger.inner.lines.into_inner().unwrap()
    }

    #[test]
    fn the_reusable_stream_race_is_not_an_error_line() {
        let at_info = lines(Level::Info);
        assert_eq!(
            at_info,
            vec![
                (
                    Level::Error,
                    "pingora_core::connectors".to_string(),
                    "failed to connect to 3 peers".to_string()
                ),
                (
                    Level::Error,
                    "edgeslice::cache".to_string(),
                    "failed to acquire reusable stream".to_string()
                ),
            ]
        );
        // At debug it is still there, as a debug line.
        let at_debug = lines(Level::Debug);
        assert_eq!(at_debug.len(), 3);
        assert_eq!(
            at_debug[0],
            (
                Level::Debug,
                "pingora_core::connectors".to_string(),
                "failed to acquire reusable stream".to_string()
            )
        );
    }
}
