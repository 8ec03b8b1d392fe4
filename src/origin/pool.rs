//! An upstream group at run time: its servers behind Pingora's load balancer, and the peer
//! settings (timeouts) every connection to them uses.

use crate::config::UpstreamSettings;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_load_balancing::{selection::RoundRobin, Backend, LoadBalancer};
use std::net::SocketAddr;
use std::sync::Arc;

pub struct UpstreamPool {
    pub settings: Arc<UpstreamSettings>,
    lb: LoadBalancer<RoundRobin>,
}

impl UpstreamPool {
    pub fn new(settings: Arc<UpstreamSettings>) -> std::io::Result<UpstreamPool> {
        let lb = LoadBalancer::try_from_iter(settings.servers.iter().copied())?;
        Ok(UpstreamPool { settings, lb })
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The next server for `key`, skipping those `skip` rejects (e.g. already tried).
    pub fn select(&self, key: &[u8], skip: impl Fn(&SocketAddr) -> bool) -> Option<SocketAddr> {
        let n = self.settings.servers.len().max(1);
        let pick =
            |b: &Backend, healthy: bool| healthy && b.addr.as_inet().is_some_and(|a| !skip(a));
        self.lb
            .select_with(key, n * 2, pick)
            .or_else(|| self.lb.select(key, n * 2))
            .and_then(|b| b.addr.as_inet().copied())
    }

    /// A Pingora peer for `addr` with this group's timeouts: `connect_timeout` per connection
    /// attempt, `read_timeout` as the idle time allowed between reads.
    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.read_timeout = Some(self.settings.read_timeout);
        peer.options.write_timeout = Some(self.settings.read_timeout);
        peer
    }
}
