//! Responses edgeslice writes itself: short plain-text errors that carry the request id.

use super::headers::X_REQUEST_ID;
use bytes::Bytes;
use pingora_error::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

pub use crate::metrics::ClientFault;

/// The status a proxy error maps to: timeouts are 504, every other upstream failure is 502,
/// a malformed request is 400.
/// The status logged for a request whose client closed the connection before its response was
/// written (nginx's convention); never sent.
pub const CLIENT_CLOSED: u16 = 499;

pub fn status_for_error(e: &Error) -> u16 {
    use ErrorType::*;
    match e.etype() {
        HTTPStatus(code) => *code,
        // The client's body did not come in time (`body_timeout`, `body_min_rate`).
        ReadTimedout if matches!(e.esource(), pingora_error::ErrorSource::Downstream) => 408,
        // The client went away while its response was being written: nginx's 499, nobody's
        // failure but the client's (an origin write error is `Upstream`).
        WriteError if !matches!(e.esource(), pingora_error::ErrorSource::Upstream) => CLIENT_CLOSED,
        // Pingora's word for the client's connection closing under a pass-through response.
        ConnectionClosed if matches!(e.esource(), pingora_error::ErrorSource::Downstream) => {
            CLIENT_CLOSED
        }
        ConnectTimedout | ReadTimedout | WriteTimedout => 504,
        ConnectRefused | ConnectNoRoute | ConnectError | ConnectionClosed | ConnectProxyFailure
        | TLSHandshakeFailure | HandshakeError => match e.esource() {
            pingora_error::ErrorSource::Downstream => 400,
            _ => 502,
        },
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 => match e.esource() {
            pingora_error::ErrorSource::Downstream => 400,
            _ => 502,
        },
        _ => match e.esource() {
            pingora_error::ErrorSource::Upstream => 502,
            pingora_error::ErrorSource::Downstream => 400,
            _ => 500,
        },
    }
}

/// How the client made the request fail, when it did: errors whose source is the client's
/// connection (Pingora tags them `Downstream`). `None`: the origin's, or ours.
pub fn client_fault(e: &Error) -> Option<ClientFault> {
    use ErrorType::*;
    if !matches!(e.esource(), pingora_error::ErrorSource::Downstream) {
        return None;
    }
    Some(match e.etype() {
        ReadTimedout | WriteTimedout => ClientFault::Timeout,
        // A send_timeout from the connection guard surfaces as a failed write too.
        ReadError | WriteError | ConnectionClosed => ClientFault::Closed,
        _ => ClientFault::Malformed,
    })
}

/// A one-line reason for a status, for the body.
pub fn reason(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        404 => "no route for this host and path",
        405 => "method not allowed",
        408 => "request body timed out",
        414 => "request target too long",
        416 => "range not satisfiable",
        431 => "request header too large",
        429 => "too many concurrent downloads or connections for this client",
        500 => "internal error",
        502 => "bad gateway: the upstream could not be reached or failed",
        503 => "service unavailable",
        504 => "gateway timeout: the upstream did not answer in time",
        508 => "loop detected: this request has passed through this CDN tier before (CDN-Loop)",
        _ => "error",
    }
}

/// Build the header of an error response (`text/plain`, `Content-Length`, `X-Request-Id`).
pub fn error_header(
    status: u16,
    body_len: usize,
    request_id: &str,
) -> pingora_error::Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(4))?;
    h.insert_header("content-type", "text/plain; charset=utf-8")?;
    h.insert_header("content-length", body_len.to_string())?;
    h.insert_header("cache-control", "no-store")?;
    if !request_id.is_empty() {
        h.insert_header(X_REQUEST_ID, request_id)?;
    }
    Ok(h)
}

/// Write a complete short error response.
pub async fn send_error(
    session: &mut Session,
    status: u16,
    request_id: &str,
) -> pingora_error::Result<()> {
    send_short(session, status, request_id, &[]).await
}

/// An error answer from the cache layer, saying what the cache did (`Cache-Status`).
pub async fn send_cache_error(
    session: &mut Session,
    status: u16,
    request_id: &str,
    cache_status: &str,
) -> pingora_error::Result<()> {
    send_short(
        session,
        status,
        request_id,
        &[("cache-status", cache_status)],
    )
    .await
}

/// 429 for a client at its `max_downloads` or `max_connections`, with `Retry-After`.
pub async fn send_too_many(session: &mut Session, request_id: &str) -> pingora_error::Result<()> {
    send_short(session, 429, request_id, &[("retry-after", "1")]).await
}

async fn send_short(
    session: &mut Session,
    status: u16,
    request_id: &str,
    extra: &[(&'static str, &str)],
) -> pingora_error::Result<()> {
    let body = Bytes::from(format!(
        "{status} {}\nrequest id: {request_id}\n",
        reason(status)
    ));
    let mut head = error_header(status, body.len(), request_id)?;
    for (n, v) in extra {
        head.insert_header(*n, *v)?;
    }
    let is_head = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(head), is_head)
        .await?;
    if !is_head {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_error::ErrorSource;

    fn error(etype: ErrorType, source: ErrorSource) -> Error {
        let mut e = *Error::new(etype);
        e.esource = source;
        e
    }

    #[test]
    fn a_client_gone_mid_response_is_499_an_origin_write_error_502() {
        use ErrorType::WriteError;
        assert_eq!(
            status_for_error(&error(WriteError, ErrorSource::Downstream)),
            499
        );
        assert_eq!(
            status_for_error(&error(WriteError, ErrorSource::Unset)),
            499
        );
        assert_eq!(
            status_for_error(&error(WriteError, ErrorSource::Upstream)),
            502
        );
        assert_eq!(
            status_for_error(&error(ErrorType::ConnectRefused, ErrorSource::Upstream)),
            502
        );
        assert_eq!(
            status_for_error(&error(ErrorType::ConnectionClosed, ErrorSource::Downstream)),
            499
        );
        assert_eq!(
            status_for_error(&error(ErrorType::ConnectionClosed, ErrorSource::Upstream)),
            502
        );
    }
}
