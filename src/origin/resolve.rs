//! Upstream server names, resolved at run time and again every `upstreams.NAME.resolve_interval`
//! (Envoy's STRICT_DNS): every address a name has is a server of its group, with the entry's
//! weight, reached with the name as written (SNI, verification), and the set follows DNS.
//!
//! ```text
//!  start, -t, reload ─► lookup_all (each name once, concurrently, LOOKUP_TIMEOUT each) ─┐
//!  ResolveLoop (one task per group with names) ─ every resolve_interval ─► lookup_all ──┤
//!                                                                                       ▼
//!   Names::observe (pure: each name's addresses and trouble, what to log) ─► Names::servers
//!        ─► UpstreamPool::set_servers: the pool's server set swapped whole when it differs
//! ```
//!
//! What an answer does to a name:
//! - addresses: they are the name's servers now (sorted; at most [`MAX_ADDRESSES_PER_NAME`], the
//!   lowest ones, so that an answer in another order changes nothing);
//! - no address (NXDOMAIN, no A/AAAA record): DNS says the name has none, so it has no server;
//! - no answer (timeout, SERVFAIL, refused, no usable `/etc/resolv.conf`): the name keeps the
//!   addresses it had, as Envoy keeps its hosts on a failed resolution, so that a DNS outage does
//!   not take the origins with it. A name that never resolved has none.
//!
//! A name with no address is a down server: its group is served by its other servers, and a
//! group with no server at all answers 502 at once (no try, no retry), as a group whose servers
//! are all down does once its tries fail. Troubles are logged once per change (WARN when a name
//! stops resolving, or resolves to more than the cap; INFO when its addresses change or it
//! resolves again), never per round or request, and every failed lookup is counted
//! (`edgeslice_upstream_resolve_failures_total`). `edgeslice -t` and the start resolve every name
//! once and say which do not resolve; neither fails for it.
//!
//! IP addresses in `servers` are never resolved: a group of addresses only has no loop.
//!
//! The resolver is hickory's, configured from the system as a pod's resolver is set up:
//! `/etc/resolv.conf` (name servers, `search`, `ndots`, `timeout`, `attempts`) and `/etc/hosts`,
//! never hickory's built-in public resolvers. It is built anew for each lookup: both files are
//! read again (a few hundred bytes, every `resolve_interval` per name), so an edited file counts
//! from the next round without watching it, and no answer is cached across rounds (each round
//! asks DNS, as getaddrinfo would). Chosen over getaddrinfo (`tokio::net::lookup_host`) because
//! its lookups are async and cancelled by their timeout: a getaddrinfo that hangs keeps a
//! blocking thread busy past any timeout, so "one lookup per name at a time" could not hold.
//! Addresses: IPv4 when the name has any, else IPv6 (Envoy's `V4_PREFERRED`), so that a
//! dual-stack name does not count each host twice.
//!
//! This module never blocks a worker thread, never holds a lock a request waits on, and never
//! runs two lookups of one name at once: a group's loop resolves its names, waits for every
//! answer (or the timeout), then sleeps `resolve_interval`. Cluster peers (issue 24) reuse
//! [`Resolve`] and [`lookup_all`].

use crate::config::{Config, ServerEntry, ServerSpec, ServerTarget, UpstreamSettings};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Longest one lookup of a name may take (all of hickory's tries, search domains and name
/// servers included); past it the round counts the name as failed (no answer).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The most servers one name makes. Each server costs a breaker, a peer, a health check per
/// interval, a few dozen metric series and 160 points of a consistent-hash ring per weight:
/// 64 is past any origin tier one group should spread over, while an answer of thousands of
/// records (a misconfigured or hostile zone) cannot grow those without bound. The lowest 64
/// addresses are kept (stable across answers in another order) and the cap is logged.
pub const MAX_ADDRESSES_PER_NAME: usize = 64;

/// A host name and port as written in `servers`.
pub type HostPort = (String, u16);

/// Why a lookup gave no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// DNS answered: the name has no address (NXDOMAIN, or no A/AAAA record).
    NoAddress(String),
    /// No answer: timed out, refused, SERVFAIL, no usable resolver configuration.
    Failed(String),
}

impl ResolveError {
    fn same_kind(&self, other: &ResolveError) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::NoAddress(m) => write!(f, "no address: {m}"),
            ResolveError::Failed(m) => write!(f, "no answer: {m}"),
        }
    }
}

/// One lookup's result.
pub type Answer = Result<Vec<SocketAddr>, ResolveError>;

/// Resolves host names: the system's resolver, or a fake in tests.
#[async_trait]
pub trait Resolve: Send + Sync {
    /// Every address `host` has now, each with `port`; an error says why there is none.
    async fn resolve(&self, host: &str, port: u16) -> Answer;
}

/// hickory's resolver, configured from `/etc/resolv.conf` and `/etc/hosts` read again for each
/// lookup (see the module doc).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

const RESOLV_CONF: &str = "/etc/resolv.conf";

impl SystemResolver {
    /// A resolver from the system's files now; the second value says what was wrong with
    /// `/etc/resolv.conf` when it could not be used (then only `/etc/hosts` answers).
    fn build() -> Result<(hickory_resolver::TokioResolver, Option<String>), String> {
        use hickory_resolver::config::{LookupIpStrategy, ResolveHosts, ResolverConfig};
        use hickory_resolver::net::runtime::TokioRuntimeProvider;
        let read = std::fs::read(RESOLV_CONF)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|e| e.to_string())
            });
        let ((config, mut options), trouble) = match read {
            Ok(c) => (c, None),
            Err(e) => (
                (
                    ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
                    Default::default(),
                ),
                Some(format!("{RESOLV_CONF}: {e}")),
            ),
        };
        options.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        options.use_hosts_file = ResolveHosts::Always;
        let resolver = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .map_err(|e| e.to_string())?;
        Ok((resolver, trouble))
    }
}

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> Answer {
        let (resolver, trouble) = SystemResolver::build().map_err(ResolveError::Failed)?;
        let with_trouble = |m: String| match &trouble {
            Some(t) => format!("{m} ({t})"),
            None => m,
        };
        match resolver.lookup_ip(host).await {
            Ok(found) => {
                let addrs: Vec<SocketAddr> =
                    found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                if addrs.is_empty() {
                    Err(ResolveError::NoAddress("no A or AAAA record".into()))
                } else {
                    Ok(addrs)
                }
            }
            Err(e) => match no_address(&e) {
                Some(why) => Err(ResolveError::NoAddress(with_trouble(why.into()))),
                None => Err(ResolveError::Failed(with_trouble(e.to_string()))),
            },
        }
    }
}

/// When DNS answered that the name has no address, how: NXDOMAIN, or NOERROR with no A/AAAA
/// record. Any other response code (SERVFAIL, REFUSED) is no answer (`None`).
fn no_address(e: &hickory_resolver::net::NetError) -> Option<&'static str> {
    use hickory_resolver::net::{DnsError, NetError};
    use hickory_resolver::proto::op::ResponseCode;
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain => Some("no such name (NXDOMAIN)"),
            ResponseCode::NoError => Some("no A or AAAA record"),
            _ => None,
        },
        _ => None,
    }
}

/// Look every name up once, concurrently, each within [`LOOKUP_TIMEOUT`].
pub async fn lookup_all(resolver: &dyn Resolve, names: &[HostPort]) -> Vec<(HostPort, Answer)> {
    let lookups = names.iter().map(|(host, port)| async move {
        let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.resolve(host, *port)).await
        {
            Ok(a) => a,
            Err(_) => Err(ResolveError::Failed(format!(
                "no answer within {LOOKUP_TIMEOUT:?}"
            ))),
        };
        ((host.clone(), *port), answer)
    });
    futures::future::join_all(lookups).await
}

/// The names of `upstreams`' servers, each once.
pub fn names_of<'a>(upstreams: impl IntoIterator<Item = &'a UpstreamSettings>) -> Vec<HostPort> {
    let mut names = Vec::new();
    for u in upstreams {
        for (host, port) in u.names() {
            let n = (host.to_string(), port);
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names
}

/// Answers by name, as a start or reload seeds new pools with.
pub type Answers = HashMap<HostPort, Answer>;

/// Resolve every name of `config` once, blocking the calling thread on a runtime of its own
/// (for `-t` and the start, before any runtime runs): at most [`LOOKUP_TIMEOUT`].
pub fn resolve_now(config: &Config, resolver: Arc<dyn Resolve>) -> Answers {
    let names = names_of(config.upstream_groups().map(|(_, u)| &**u));
    if names.is_empty() {
        return Answers::new();
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let why = ResolveError::Failed(format!("no runtime to resolve on: {e}"));
            return names.into_iter().map(|n| (n, Err(why.clone()))).collect();
        }
    };
    rt.block_on(lookup_all(&*resolver, &names))
        .into_iter()
        .collect()
}

/// What `-t` and the start say of the names that do not resolve now, one line each:
/// `upstreams.o.servers[0]: origin:80 does not resolve now (no address: ...): ...`.
pub fn warnings(config: &Config, answers: &Answers) -> Vec<String> {
    let mut out = Vec::new();
    for (group, u) in config.upstream_groups() {
        for (i, s) in u.servers.iter().enumerate() {
            let ServerTarget::Name { host, port } = &s.target else {
                continue;
            };
            if let Some(Err(e)) = answers.get(&(host.clone(), *port)) {
                let (at, what) = if group == crate::config::cluster::PEER_GROUP {
                    ("cluster.peers".to_string(), "peer")
                } else {
                    (format!("upstreams.{group}.servers[{i}]"), "server")
                };
                out.push(format!(
                    "{at}: {host}:{port} does not resolve now ({e}): a down {what} until it does, resolved again every {:?}",
                    u.resolve_interval
                ));
            }
        }
    }
    out
}

/// What one name resolves to, kept between rounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameState {
    /// Its servers' addresses now: sorted, without repeats, at most [`MAX_ADDRESSES_PER_NAME`].
    pub addrs: Vec<SocketAddr>,
    /// Why its last lookup gave no address, while that lasts.
    pub trouble: Option<ResolveError>,
}

/// What a lookup changed about a name, to be logged; `None` from [`NameState::observe`] when
/// nothing did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct News {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
    /// The answer had this many addresses, over the cap.
    pub capped: Option<usize>,
    /// The lookup's trouble, when it began or changed kind with this lookup.
    pub trouble: Option<ResolveError>,
    /// The name resolves again after a trouble.
    pub recovered: bool,
}

impl NameState {
    /// Take one lookup's answer (see the module doc for what each kind does).
    pub fn observe(&mut self, answer: Answer) -> Option<News> {
        let mut news = News::default();
        let before = std::mem::take(&mut self.addrs);
        let after = match answer {
            Ok(mut addrs) => {
                addrs.sort_unstable();
                addrs.dedup();
                if addrs.len() > MAX_ADDRESSES_PER_NAME {
                    news.capped = Some(addrs.len());
                    addrs.truncate(MAX_ADDRESSES_PER_NAME);
                }
                news.recovered = self.trouble.take().is_some();
                addrs
            }
            Err(e) => {
                let kept = match e {
                    ResolveError::NoAddress(_) => Vec::new(),
                    ResolveError::Failed(_) => before.clone(),
                };
                if !self.trouble.as_ref().is_some_and(|t| t.same_kind(&e)) {
                    news.trouble = Some(e.clone());
                }
                self.trouble = Some(e);
                kept
            }
        };
        news.added = after
            .iter()
            .filter(|a| before.binary_search(a).is_err())
            .copied()
            .collect();
        news.removed = before
            .iter()
            .filter(|a| after.binary_search(a).is_err())
            .copied()
            .collect();
        self.addrs = after;
        let moved = !news.added.is_empty() || !news.removed.is_empty();
        // A cap repeated with the same addresses is not news.
        if !moved {
            news.capped = None;
        }
        (moved || news.trouble.is_some() || news.recovered).then_some(news)
    }
}

/// Every name of one group and what it resolves to; only its resolve loop (and the seeding of
/// a new pool) touches it, never a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names(BTreeMap<HostPort, NameState>);

impl Names {
    /// Take a round of answers, logging what changed for the group `upstream`; returns how many
    /// lookups failed.
    pub fn observe_all(&mut self, upstream: &str, answers: &[(HostPort, Answer)]) -> u64 {
        let mut failed = 0;
        for (name, answer) in answers {
            failed += u64::from(answer.is_err());
            let state = self.0.entry(name.clone()).or_default();
            if let Some(news) = state.observe(answer.clone()) {
                log_news(upstream, name, &news, state);
            }
        }
        failed
    }

    /// Keep what `other` knows of the names `settings` has (a reload's new pool starts from its
    /// predecessor's answers); nothing is logged.
    pub fn adopt(&mut self, other: &Names, settings: &UpstreamSettings) {
        for (host, port) in settings.names() {
            let key = (host.to_string(), port);
            if let Some(state) = other.0.get(&key) {
                self.0.insert(key, state.clone());
            }
        }
    }

    /// The group's servers: its entries in the order written, each name by the addresses it
    /// resolves to now (none while it does not); an address made by two entries is the first
    /// one's server.
    pub fn servers(&self, entries: &[ServerEntry]) -> Vec<ServerSpec> {
        let mut out: Vec<ServerSpec> = Vec::new();
        let mut push = |spec: ServerSpec| {
            if !out.iter().any(|s| s.addr == spec.addr) {
                out.push(spec);
            }
        };
        for e in entries {
            match &e.target {
                ServerTarget::Addr(a) => push(e.at(*a)),
                ServerTarget::Name { host, port } => {
                    if let Some(state) = self.0.get(&(host.clone(), *port)) {
                        for a in &state.addrs {
                            push(e.at(*a));
                        }
                    }
                }
            }
        }
        out
    }
}

fn log_news(upstream: &str, (host, port): &HostPort, news: &News, now: &NameState) {
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(e) = &news.trouble {
        let consequence = match (e, now.addrs.len()) {
            (_, 0) => "it has no server until it resolves".to_string(),
            (_, n) => format!("its {n} servers are kept until DNS answers"),
        };
        log::warn!("upstream {upstream}: {host}:{port} does not resolve ({e}): {consequence}");
    }
    if let Some(total) = news.capped {
        log::warn!(
            "upstream {upstream}: {host}:{port} resolves to {total} addresses; only the lowest {MAX_ADDRESSES_PER_NAME} are servers"
        );
    }
    if news.added.is_empty() && news.removed.is_empty() {
        if news.recovered {
            log::info!("upstream {upstream}: {host}:{port} resolves again, to the same addresses");
        }
        return;
    }
    log::info!(
        "upstream {upstream}: {host}:{port} resolves to [{}] (added [{}], removed [{}])",
        list(&now.addrs),
        list(&news.added),
        list(&news.removed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 80))
    }

    #[test]
    fn the_same_answer_in_another_order_is_no_news() {
        let mut s = NameState::default();
        let first = s.observe(Ok(vec![a(2), a(1), a(2)])).expect("news");
        assert_eq!(first.added, vec![a(1), a(2)]);
        assert!(first.removed.is_empty() && first.trouble.is_none());
        assert_eq!(s.addrs, vec![a(1), a(2)]);
        assert_eq!(s.observe(Ok(vec![a(2), a(1)])), None);
        // A move says what came and went.
        let moved = s.observe(Ok(vec![a(3), a(2)])).expect("news");
        assert_eq!((moved.added, moved.removed), (vec![a(3)], vec![a(1)]));
    }

    #[test]
    fn no_address_empties_the_name_and_no_answer_keeps_it() {
        let mut s = NameState::default();
        s.observe(Ok(vec![a(1)]));
        // DNS cannot be reached: the addresses stay; said once.
        let failed = s
            .observe(Err(ResolveError::Failed("timeout".into())))
            .expect("news");
        assert!(matches!(failed.trouble, Some(ResolveError::Failed(_))));
        assert!(failed.removed.is_empty());
        assert_eq!(s.addrs, vec![a(1)]);
        assert_eq!(
            s.observe(Err(ResolveError::Failed("timeout again".into()))),
            None
        );
        // DNS says the name is gone: so are its servers.
        let gone = s
            .observe(Err(ResolveError::NoAddress("NXDOMAIN".into())))
            .expect("news");
        assert!(matches!(gone.trouble, Some(ResolveError::NoAddress(_))));
        assert_eq!(gone.removed, vec![a(1)]);
        assert!(s.addrs.is_empty());
        assert_eq!(
            s.observe(Err(ResolveError::NoAddress("NXDOMAIN".into()))),
            None
        );
        // It resolves again.
        let back = s.observe(Ok(vec![a(4)])).expect("news");
        assert!(back.recovered && back.trouble.is_none());
        assert_eq!(back.added, vec![a(4)]);
        assert_eq!(s.trouble, None);
    }

    #[test]
    fn a_name_that_never_resolved_has_no_server() {
        let mut s = NameState::default();
        let news = s
            .observe(Err(ResolveError::Failed("refused".into())))
            .expect("news");
        assert!(news.trouble.is_some() && news.added.is_empty());
        assert!(s.addrs.is_empty());
    }

    #[test]
    fn a_large_answer_is_capped_to_its_lowest_addresses_said_once() {
        let many: Vec<SocketAddr> = (0..200u16)
            .rev()
            .map(|i| SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80)))
            .collect();
        let mut s = NameState::default();
        let news = s.observe(Ok(many.clone())).expect("news");
        assert_eq!(news.capped, Some(200));
        assert_eq!(s.addrs.len(), MAX_ADDRESSES_PER_NAME);
        assert_eq!(s.addrs[0], SocketAddr::from(([10, 1, 0, 0], 80)));
        let mut shuffled = many;
        shuffled.rotate_left(77);
        assert_eq!(s.observe(Ok(shuffled)), None);
    }

    fn entry(target: ServerTarget, weight: u32) -> ServerEntry {
        ServerEntry { target, weight }
    }

    fn name(host: &str) -> ServerTarget {
        ServerTarget::Name {
            host: host.into(),
            port: 80,
        }
    }

    #[test]
    fn servers_are_the_entries_with_each_name_expanded() {
        let entries = vec![
            entry(ServerTarget::Addr(a(9)), 1),
            entry(name("origin"), 3),
            entry(name("late."), 1),
            // Another entry reaching an address already in the group adds nothing.
            entry(ServerTarget::Addr(a(1)), 5),
        ];
        let mut names = Names::default();
        assert_eq!(
            names
                .servers(&entries)
                .iter()
                .map(|s| s.addr)
                .collect::<Vec<_>>(),
            vec![a(9), a(1)],
            "unresolved names make no server"
        );
        let failed = names.observe_all(
            "o",
            &[
                (("origin".into(), 80), Ok(vec![a(2), a(1)])),
                (
                    ("late.".into(), 80),
                    Err(ResolveError::NoAddress("NXDOMAIN".into())),
                ),
            ],
        );
        assert_eq!(failed, 1);
        let servers = names.servers(&entries);
        assert_eq!(
            servers.iter().map(|s| s.addr).collect::<Vec<_>>(),
            vec![a(9), a(1), a(2)]
        );
        // Each resolved address has the entry's weight and name (the SNI of a TLS group).
        assert_eq!(servers[1].weight, 3);
        assert_eq!(servers[1].name.as_deref(), Some("origin"));
        assert_eq!(servers[0].name, None);
        // A new pool adopts what its predecessor knew, for the names it has.
        let mut adopted = Names::default();
        let settings = Config::from_yaml(
            "upstreams:\n  o:\n    servers: [\"origin:80\", \"other:80\"]\nroutes:\n  - upstream: o\n",
        )
        .expect("config");
        adopted.adopt(&names, &settings.upstreams["o"]);
        assert_eq!(adopted.0.len(), 1);
        assert_eq!(
            adopted.0[&("origin".to_string(), 80)].addrs,
            vec![a(1), a(2)]
        );
    }

    struct Slow;

    #[async_trait]
    impl Resolve for Slow {
        async fn resolve(&self, host: &str, port: u16) -> Answer {
            if host == "slow" {
                std::future::pending::<()>().await;
            }
            Ok(vec![SocketAddr::from(([127, 0, 0, 2], port))])
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_that_hangs_is_a_failure_after_the_timeout() {
        let names = vec![("slow".to_string(), 80), ("fast".to_string(), 81)];
        let started = tokio::time::Instant::now();
        let answers = lookup_all(&Slow, &names).await;
        assert_eq!(started.elapsed(), LOOKUP_TIMEOUT);
        assert!(matches!(answers[0].1, Err(ResolveError::Failed(_))));
        assert_eq!(
            answers[1].1,
            Ok(vec![SocketAddr::from(([127, 0, 0, 2], 81))])
        );
    }
}
