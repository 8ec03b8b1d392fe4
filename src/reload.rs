//! Reload in place: SIGHUP or `POST /reload` reads the config file again and puts what can
//! change live in force (see [`crate::config::live`]) without dropping a connection or a byte of
//! the cache.
//!
//! ```text
//!  SIGHUP ──────────────┐
//!  POST /reload ─► ReloadHandle ─(bounded queue)─► ReloadService (one task) ─► Reloader::reload
//!                                                     load_checked ─► live::apply
//!                                                     ─► names of new groups looked up
//!                                                     ─► Runtime::build ─► shaper.update
//!                                                     ─► Current.store
//! ```
//! One task runs every reload, so two never interleave; each reads one file, looks up the
//! server names of the groups it changes (at most `origin::resolve::LOOKUP_TIMEOUT`) and builds
//! a few pools, and a full queue is answered at once. A file that does not load
//! changes nothing, and the error is what `edgeslice -t` prints for it. The same task owns the
//! health-check loops of the pools (see [`crate::runtime`]), the first ones included.

use crate::config::{self, live, Config};
use crate::origin::resolve::{self, Answers};
use crate::runtime::{Current, Runtime, Shared};
use crate::shaping::Shaper;
use crate::tls::ListenTable;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Reload requests waiting at once; more are refused (503) rather than queued.
const QUEUE: usize = 4;
/// Longest an admin request waits for its reload's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// What a reload put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys that changed in the file but cannot change live: left as they run.
    pub ignored: Vec<&'static str>,
}

impl Reloaded {
    /// The `/reload` answer: `reloaded`, then the keys left as they were, if any.
    pub fn answer(&self) -> String {
        let mut out = String::from("reloaded\n");
        if !self.ignored.is_empty() {
            out.push_str(&format!("{}\n", ignored_line(&self.ignored)));
        }
        out
    }
}

fn ignored_line(keys: &[&str]) -> String {
    format!(
        "not applied (not live; restart, or upgrade gracefully with -u): {}",
        keys.join(", ")
    )
}

/// Why a reload did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The file does not load: what `edgeslice -t` prints for it.
    Invalid(String),
    /// It loads but the pools could not be built from it.
    Failed(String),
    /// Too many reloads waiting, or the reload task is not running.
    Busy(&'static str),
}

impl Refused {
    pub fn status(&self) -> u16 {
        match self {
            Refused::Invalid(_) => 422,
            Refused::Failed(_) => 500,
            Refused::Busy(_) => 503,
        }
    }

    pub fn answer(&self) -> String {
        match self {
            Refused::Invalid(m) | Refused::Failed(m) => format!("{m}\n"),
            Refused::Busy(m) => format!("{m}\n"),
        }
    }
}

/// Builds and installs the next snapshot. Only the reload task calls it (serialized).
pub struct Reloader {
    file: PathBuf,
    current: Current,
    shared: Shared,
    shaper: Shaper,
    /// The TLS listeners, whose certificates each reload reads again.
    tls: Arc<ListenTable>,
}

impl Reloader {
    pub fn new(file: PathBuf, current: Current, shared: Shared, shaper: Shaper) -> Reloader {
        Reloader {
            file,
            current,
            shared,
            shaper,
            tls: Arc::new(ListenTable::default()),
        }
    }

    /// Read the certificates of `tls` again on each reload.
    pub fn with_tls(mut self, tls: Arc<ListenTable>) -> Reloader {
        self.tls = tls;
        self
    }

    /// Read the file again and put it in force. `health`: the shutdown watch the pools'
    /// health-check loops stop on (they are spawned on the caller's runtime).
    pub async fn reload(&self, health: &ShutdownWatch) -> Result<Reloaded, Refused> {
        let done = self.apply(health).await;
        self.shared.stats.metrics.reloaded(done.is_ok());
        done
    }

    async fn apply(&self, health: &ShutdownWatch) -> Result<Reloaded, Refused> {
        // Reading the file, checking the disk directory and resolving host names block: not on
        // the thread the health checks run on.
        let file = self.file.clone();
        let running = self.current.load_full().config.listen.clone();
        let tls = self.tls.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let new = Config::load_checked(&file)?;
            // The certificates, from the running `listen` entries (they change only with a
            // restart); as written in the new file when it has the same ones, so that an error
            // names the line it is on now.
            let listen = if new.listen == running {
                &new.listen
            } else {
                &running
            };
            let certs = tls.read_again(listen)?;
            Ok((new, certs))
        })
        .await
        .map_err(|e| Refused::Failed(format!("edgeslice: reload failed: {e}")))?;
        let (new, certs) =
            loaded.map_err(|e| Refused::Invalid(config::error_report(&self.file, &e)))?;
        for w in &new.warnings {
            log::warn!("reload: {w}");
        }
        let old = self.current.load_full();
        let (applied, ignored) = live::apply(&old.config, new);
        // A changed group gets a new pool: its names are looked up before it serves (those it
        // shares with its predecessor keep their addresses should DNS not answer).
        let names = resolve::names_of(old.new_groups(&applied));
        let answers: Answers = resolve::lookup_all(&**self.shared.resolver(), &names)
            .await
            .into_iter()
            .collect();
        let (next, pools) = Runtime::build(
            Arc::new(applied),
            Some(&old),
            &self.shared,
            Some(health),
            &answers,
        )
        .map_err(|e| Refused::Failed(format!("edgeslice: reload failed: {e}")))?;
        self.shaper
            .update(next.config.shaping.clone().unwrap_or_default());
        let (routes, checked) = (next.config.routes.len(), next.health_checks());
        self.current.store(Arc::new(next));
        self.tls.install(certs);
        self.tls.warn_expiring();
        log::info!(
            "reload: {} in force: {routes} routes, upstream pools {} kept and {} new ({checked} health-checked)",
            self.file.display(),
            pools.reused,
            pools.created,
        );
        if !ignored.is_empty() {
            log::warn!("reload: {}", ignored_line(&ignored));
        }
        Ok(Reloaded { ignored })
    }

    /// The snapshot in force again, with a health-check loop for every pool that has
    /// `health_check` and a resolve loop for every pool with server names (at start, before
    /// any reload).
    fn start_health_checks(&self, health: &ShutdownWatch) {
        let now = self.current.load_full();
        let none = Answers::new();
        match Runtime::build(
            now.config.clone(),
            Some(&now),
            &self.shared,
            Some(health),
            &none,
        ) {
            Ok((next, _)) => self.current.store(Arc::new(next)),
            // Not reachable: every pool is reused, none is built.
            Err(e) => log::error!("health checks not started: {e}"),
        }
    }
}

type Reply = oneshot::Sender<Result<Reloaded, Refused>>;

/// What the admin endpoint holds to ask for a reload.
#[derive(Clone)]
pub struct ReloadHandle {
    queue: mpsc::Sender<Reply>,
}

impl ReloadHandle {
    pub async fn reload(&self) -> Result<Reloaded, Refused> {
        let (tx, rx) = oneshot::channel();
        self.queue.try_send(tx).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Refused::Busy("reloads already waiting; try again")
            }
            mpsc::error::TrySendError::Closed(_) => Refused::Busy("reload is not running"),
        })?;
        match tokio::time::timeout(ANSWER_WITHIN, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Refused::Busy("reload is not running")),
            Err(_) => Err(Refused::Busy("reload did not answer in time")),
        }
    }
}

/// The task every reload runs on: SIGHUP and the admin's requests, one at a time.
pub struct ReloadService {
    reloader: Reloader,
    requests: Mutex<Option<mpsc::Receiver<Reply>>>,
    /// Keeps the queue open without an admin listener (no handle held), so the task runs on
    /// for SIGHUP and the health checks.
    _open: mpsc::Sender<Reply>,
}

impl ReloadService {
    pub fn new(reloader: Reloader) -> (ReloadService, ReloadHandle) {
        let (queue, requests) = mpsc::channel(QUEUE);
        let service = ReloadService {
            reloader,
            requests: Mutex::new(Some(requests)),
            _open: queue.clone(),
        };
        (service, ReloadHandle { queue })
    }
}

/// SIGHUP is ignored from the start until the reload task listens for it: its default action
/// would end the process.
pub fn ignore_sighup_until_listening() {
    // SAFETY: only sets SIGHUP's disposition to "ignore"; no handler code is involved.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

#[async_trait::async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let Some(mut requests) = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        self.reloader.start_health_checks(&shutdown);
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("reload: cannot listen for SIGHUP ({e}); POST /reload still works");
                None
            }
        };
        log::info!(
            "reload: SIGHUP or POST /reload reads {} again",
            self.reloader.file.display()
        );
        let health = shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { hup.as_mut()?.recv().await } => {
                    log::info!("SIGHUP: reloading {}", self.reloader.file.display());
                    if let Err(e) = self.reloader.reload(&health).await {
                        log::error!("reload refused, the running configuration stays: {}", e.answer().trim_end());
                    }
                }
                Some(reply) = requests.recv() => {
                    log::info!("POST /reload: reloading {}", self.reloader.file.display());
                    let outcome = self.reloader.reload(&health).await;
                    if let Err(e) = &outcome {
                        log::error!("reload refused, the running configuration stays: {}", e.answer().trim_end());
                    }
                    // The asker may have given up waiting: the reload happened all the same.
                    let _ = reply.send(outcome);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(Reloaded { ignored: vec![] }.answer(), "reloaded\n");
        let with = Reloaded {
            ignored: vec!["listen", "cache.memory.capacity"],
        }
        .answer();
        assert!(with.starts_with("reloaded\n"), "{with}");
        assert!(with.contains("listen, cache.memory.capacity"), "{with}");
        assert_eq!(Refused::Invalid("x".into()).status(), 422);
        assert_eq!(Refused::Invalid("x".into()).answer(), "x\n");
    }
}
