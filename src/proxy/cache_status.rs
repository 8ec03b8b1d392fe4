//! The RFC 9211 `Cache-Status` of a response, as a value: set where the cache layer decides,
//! rendered in one place ([`CacheStatus::render`]) for the header and the access log.

use crate::metrics::CacheResult;
use std::borrow::Cow;

/// What the cache did for a request (`None` in the request context: it was not involved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Metadata fresh and every needed chunk cached.
    Hit,
    /// An expired copy served because every origin failed.
    StaleIfError,
    /// An expired copy served while one background revalidation runs (RFC 5861).
    StaleWhileRevalidate,
    /// An expired copy the request's `max-stale` accepted (RFC 9111 §5.2.1.2).
    StaleAccepted,
    /// Metadata fresh, some chunks fetched now.
    Partial,
    /// First fetch of the object, stored.
    Miss,
    /// Expired, revalidated with a 304.
    Revalidated,
    /// The request asked for revalidation (`no-cache`, `max-age=0`); the origin said 304.
    RequestRevalidated,
    /// Answered by the discovery or revalidation another request made while this one waited
    /// on the object (RFC 9211 `collapsed`), though already stale on receipt; `stale`: this
    /// request found a stale copy (`fwd=stale`), not none (`fwd=miss`).
    Collapsed { stale: bool },
    /// Not cacheable (the reason): passed through.
    Bypass(&'static str),
    /// The request itself forbade the cache (`no-store`, credentials): passed through.
    Request(&'static str),
    /// The origin's answer to the first fetch, relayed as it was (not cacheable).
    Relayed { status: u16, reason: &'static str },
    /// The cache could not get the object: answered `status` (with a reason when known).
    Failed {
        status: u16,
        detail: Option<&'static str>,
    },
}

impl CacheStatus {
    /// The header value.
    pub fn render(self) -> Cow<'static, str> {
        match self {
            CacheStatus::Hit => "edgeslice; hit".into(),
            CacheStatus::StaleIfError => "edgeslice; hit; detail=stale-if-error".into(),
            CacheStatus::StaleWhileRevalidate => {
                "edgeslice; hit; detail=stale-while-revalidate".into()
            }
            CacheStatus::StaleAccepted => "edgeslice; hit; detail=max-stale".into(),
            CacheStatus::Partial => "edgeslice; fwd=partial; stored".into(),
            CacheStatus::Miss => "edgeslice; fwd=miss; stored".into(),
            CacheStatus::Revalidated => "edgeslice; fwd=stale; fwd-status=304; stored".into(),
            CacheStatus::RequestRevalidated => {
                "edgeslice; fwd=request; fwd-status=304; stored".into()
            }
            CacheStatus::Collapsed { stale: true } => "edgeslice; fwd=stale; collapsed".into(),
            CacheStatus::Collapsed { stale: false } => "edgeslice; fwd=miss; collapsed".into(),
            CacheStatus::Bypass(reason) => format!("edgeslice; fwd=bypass; detail={reason}").into(),
            CacheStatus::Request(reason) => {
                format!("edgeslice; fwd=request; detail={reason}").into()
            }
            CacheStatus::Relayed { status, reason } => {
                format!("edgeslice; fwd=miss; fwd-status={status}; detail={reason}").into()
            }
            CacheStatus::Failed {
                status,
                detail: None,
            } => format!("edgeslice; fwd=miss; fwd-status={status}").into(),
            CacheStatus::Failed {
                status,
                detail: Some(d),
            } => format!("edgeslice; fwd=miss; fwd-status={status}; detail={d}").into(),
        }
    }

    /// The `cache` label of metrics.
    pub fn result(status: Option<CacheStatus>) -> CacheResult {
        match status {
            None => CacheResult::None,
            Some(CacheStatus::Hit) => CacheResult::Hit,
            Some(
                CacheStatus::StaleIfError
                | CacheStatus::StaleWhileRevalidate
                | CacheStatus::StaleAccepted,
            ) => CacheResult::Stale,
            Some(CacheStatus::Partial) => CacheResult::Partial,
            Some(
                CacheStatus::Revalidated
                | CacheStatus::RequestRevalidated
                | CacheStatus::Collapsed { stale: true },
            ) => CacheResult::Revalidated,
            Some(
                CacheStatus::Miss
                | CacheStatus::Relayed { .. }
                | CacheStatus::Failed { .. }
                | CacheStatus::Collapsed { stale: false },
            ) => CacheResult::Miss,
            Some(CacheStatus::Bypass(_) | CacheStatus::Request(_)) => CacheResult::Pass,
        }
    }

    /// The value for the access log: `-` when the cache was not involved.
    pub fn log_field(status: Option<CacheStatus>) -> Cow<'static, str> {
        status.map_or(Cow::Borrowed("-"), CacheStatus::render)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc_9211_values() {
        assert_eq!(CacheStatus::Hit.render(), "edgeslice; hit");
        assert_eq!(
            CacheStatus::Collapsed { stale: true }.render(),
            "edgeslice; fwd=stale; collapsed"
        );
        assert_eq!(
            CacheStatus::Relayed {
                status: 404,
                reason: "status"
            }
            .render(),
            "edgeslice; fwd=miss; fwd-status=404; detail=status"
        );
        assert_eq!(
            CacheStatus::Failed {
                status: 502,
                detail: Some("origin-error")
            }
            .render(),
            "edgeslice; fwd=miss; fwd-status=502; detail=origin-error"
        );
        assert_eq!(
            CacheStatus::Bypass("no-store").render(),
            "edgeslice; fwd=bypass; detail=no-store"
        );
        assert_eq!(CacheStatus::log_field(None), "-");
        // Fixed values cost no allocation.
        assert!(matches!(CacheStatus::Hit.render(), Cow::Borrowed(_)));
    }
}
