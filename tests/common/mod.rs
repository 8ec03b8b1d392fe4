//! Shared integration-test harness: in-process origins ([`origin`]) and the real edgeslice
//! binary started on loopback ports ([`proxy`]).
#![allow(dead_code)]

pub mod origin;
pub mod proxy;

/// A reqwest client that never uses a system proxy and does not pool across tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}
