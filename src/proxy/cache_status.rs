//! The RFC 9211 `Cache-Status` of a response, as a value: set where the cache layer decides,
//! rendered in one place ([`CacheStatus::render`]) for the header and the access log.

use crate::metrics::CacheResult;
use std::borrow::Cow;

/// The name every entry of [`CacheStatus::render`] has; [`CacheStatus::field`] puts the
/// tier's `cluster.cdn_id` in its place.
const DEFAULT_NAME: &str = "edgeslice";

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

    /// The `Cache-Status` field this cache sends, named `name` (`cluster.cdn_id`, so each
    /// tier's entry is its own): after `upstream`, the list the answer it serves came with
    /// (RFC 9211 §2: each cache in the path adds its entry, the origin's side first), so the
    /// field tells which tier answered. Without an upstream list and under the default name it
    /// is the fixed value, with no allocation.
    pub fn field(self, name: &str, upstream: Option<&[u8]>) -> Cow<'static, str> {
        let ours = self.render();
        let ours: Cow<'static, str> = if name == DEFAULT_NAME {
            ours
        } else {
            format!("{name}{}", &ours[DEFAULT_NAME.len()..]).into()
        };
        let upstream = upstream
            .and_then(|u| std::str::from_utf8(u).ok())
            .map(str::trim)
            .filter(|u| !u.is_empty());
        match upstream {
            Some(u) => format!("{u}, {ours}").into(),
            None => ours,
        }
    }

    /// Set `h`'s `Cache-Status` to [`CacheStatus::field`] over the list it holds.
    pub fn set_on(
        self,
        h: &mut pingora_http::ResponseHeader,
        name: &str,
    ) -> pingora_error::Result<()> {
        let v = self.field(name, h.headers.get("cache-status").map(|v| v.as_bytes()));
        h.insert_header("cache-status", v.as_ref())?;
        Ok(())
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
        // Each tier's entry under its own name, after the list the answer came with.
        assert!(matches!(
            CacheStatus::Hit.field("edgeslice", None),
            Cow::Borrowed(_)
        ));
        assert_eq!(CacheStatus::Hit.field("edge", None), "edge; hit");
        assert_eq!(
            CacheStatus::Miss.field("edge", Some(b"shield; fwd=miss; stored")),
            "shield; fwd=miss; stored, edge; fwd=miss; stored"
        );
        assert_eq!(CacheStatus::Hit.field("edge", Some(b"  ")), "edge; hit");
        // Fixed values cost no allocation.
        assert!(matches!(CacheStatus::Hit.render(), Cow::Borrowed(_)));
    }
}
