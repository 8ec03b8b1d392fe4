//! The ceiling of the framework: bare Pingora answering every request from `request_filter`
//! with a fixed body, no routing, no cache, no log. `benches/compare.sh` runs it beside
//! edgeslice and nginx.
//!
//! `bare_pingora --listen 127.0.0.1:PORT --body BYTES [--threads N]` serves until killed. Run
//! without `--listen` (as `cargo test --all-targets` does) it exits at once.

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};

struct Fixed {
    body: Bytes,
}

#[async_trait]
impl ProxyHttp for Fixed {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let len = self.body.len();
        let mut h = ResponseHeader::build(206, Some(4))?;
        h.insert_header("content-type", "application/octet-stream")?;
        h.insert_header("content-length", len.to_string())?;
        h.insert_header(
            "content-range",
            format!("bytes 0-{}/{}", len.max(1) - 1, len),
        )?;
        h.insert_header("accept-ranges", "bytes")?;
        session.write_response_header(Box::new(h), false).await?;
        session
            .write_response_body(Some(self.body.clone()), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _s: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Err(Error::explain(ErrorType::InternalError, "no upstream"))
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(listen) = arg(&args, "--listen") else {
        return;
    };
    let body_len: usize = arg(&args, "--body")
        .and_then(|b| b.parse().ok())
        .unwrap_or(4096);
    let threads: usize = arg(&args, "--threads")
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let conf = ServerConf {
        threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut svc = pingora_proxy::http_proxy_service(
        &server.configuration,
        Fixed {
            body: Bytes::from(vec![b'x'; body_len]),
        },
    );
    svc.add_tcp(&listen);
    server.add_service(svc);
    server.run_forever();
}
