//! The framing of a response body whose length is not known when its header goes out (an
//! origin's chunked body relayed or streamed as it arrives), so that a client can always tell
//! a body cut short from a complete one.
//!
//! - HTTP/1.1 clients get `Transfer-Encoding: chunked`: a break ends the response without the
//!   terminating chunk (curl: exit 18).
//! - HTTP/1.0 clients cannot take chunked framing: the body is close-delimited, the header says
//!   `Connection: close`, and a break resets the connection ([`abort`]) instead of closing it,
//!   since a clean close is how a close-delimited body ends.
//!
//! Never a body of unknown length without one of the two: Pingora would write it
//! close-delimited while its header still says `Connection: keep-alive`, and a cut would look
//! complete.

use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// How a body of unknown length goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// It has a length, or no body at all (HEAD, 204, 304): nothing to do.
    Known,
    Chunked,
    /// HTTP/1.0: delimited by the close of the connection.
    CloseDelimited,
}

/// Frame the body of `h` (about to be written) when it has no `Content-Length`.
pub fn frame_unknown_length(
    session: &mut Session,
    h: &mut ResponseHeader,
) -> pingora_error::Result<Framing> {
    let req = session.req_header();
    let bodiless = req.method == http::Method::HEAD
        || h.status.is_informational()
        || matches!(h.status.as_u16(), 204 | 304);
    if bodiless || h.headers.contains_key(http::header::CONTENT_LENGTH) {
        return Ok(Framing::Known);
    }
    if req.version >= http::Version::HTTP_11 {
        h.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        Ok(Framing::Chunked)
    } else {
        h.remove_header(&http::header::TRANSFER_ENCODING);
        // Before the header is written: Pingora derives its `Connection` field from this.
        session.set_keepalive(None);
        Ok(Framing::CloseDelimited)
    }
}

/// A response that broke mid-body: make its end unmistakable. A close-delimited body ends by
/// a reset (`SO_LINGER` 0), never by the clean close that would complete it; a chunked body
/// lacks its last chunk already, and its connection is closed as usual.
pub fn abort(session: &Session, framing: Framing) {
    if framing != Framing::CloseDelimited {
        return;
    }
    let Some(fd) = session.as_downstream().stream().map(|s| s.id()) else {
        return;
    };
    if fd < 0 {
        return;
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is the client's socket, open while the session holds its stream; the call
    // reads `linger` (of the size given) and nothing else.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
