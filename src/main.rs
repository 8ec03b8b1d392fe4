//! `edgeslice -c FILE` runs the proxy; `edgeslice -t -c FILE` checks the config and exits.

use clap::Parser;
use edgeslice::config::{self, Config};
use edgeslice::server::{self, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "edgeslice", version, about = "Edge caching reverse proxy")]
struct Cli {
    /// Path to the YAML configuration file.
    #[arg(
        short = 'c',
        long = "conf",
        default_value = "/etc/edgeslice/edgeslice.yaml"
    )]
    conf: PathBuf,
    /// Test the configuration and exit: 0 when valid, 1 with the error otherwise.
    #[arg(short = 't', long = "test")]
    test: bool,
    /// Run in the background (Pingora daemon mode; see server.pid_file).
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Take over the listening sockets of a running instance (graceful upgrade via server.upgrade_sock).
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
}

/// The allocator, chosen by measurement (issue 13). 4 KiB range hits, wrk -c64, 8 alternating
/// rounds of 4 s each on 2 vCPUs: jemalloc with the settings below 67.2k req/s against glibc's
/// 59.0k (+14 %); mimalloc +5 %. 1 MiB hits: no difference beyond the noise (4.3k against 4.4k).
/// Memory had to stay bounded too: unconfigured, jemalloc kept 118 MiB of 10,000 closed
/// connections (glibc with `conn::trim`: +2 MiB) and mimalloc broke the peak bound of
/// tests/memory_bound.rs (351 MiB against 320 MiB). With the settings below: +2 MiB after the
/// connections closed, peaks 243–246 MiB (300 cold fills) and 262–267 MiB (40 stalled readers),
/// where glibc measured 218–280 MiB.
///
/// This replaces glibc's tuning (a fixed 128 KiB mmap threshold and two arenas), which only
/// concerned glibc's own heap.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its first allocation:
/// - `background_thread`: a thread returns freed pages to the system after `dirty_decay_ms`,
///   also when no allocation happens (`conn::trim` starts it again after a daemon fork);
/// - `muzzy_decay_ms:0`: returned outright, not kept as lazily freed pages;
/// - `oversize_threshold`: blocks of a chunk's size (1 MiB) and up come from jemalloc's
///   dedicated arena that returns them as soon as they are freed, as glibc's mmap threshold
///   did, so chunk buffers do not linger once evicted (peaks 291–302 MiB without it).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] =
    b"background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0,oversize_threshold:1048576\0";

fn main() -> ExitCode {
    edgeslice::logging::init();
    let cli = Cli::parse();
    let config = match Config::load_checked(&cli.conf) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}", config::error_report(&cli.conf, &e));
            return ExitCode::from(1);
        }
    };
    // Allowed but unsafe settings (`upstreams.<name>.tls.verify: false`): said by `-t` and at
    // every start (and reload).
    for w in &config.warnings {
        if cli.test {
            eprintln!("edgeslice: warning: {w}");
        } else {
            log::warn!("{w}");
        }
    }
    // The TLS listeners' certificate files: read (and checked) here, for `-t` too.
    let tls = match edgeslice::tls::ListenTable::load(&config.listen) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}", config::error_report(&cli.conf, &e));
            return ExitCode::from(1);
        }
    };
    if cli.test {
        // Server names that do not resolve here are warned about, not refused: in Kubernetes
        // an origin's Service name often resolves only where (and once) the proxy runs.
        let answers = edgeslice::origin::resolve::resolve_now(
            &config,
            std::sync::Arc::new(edgeslice::origin::resolve::SystemResolver),
        );
        for w in edgeslice::origin::resolve::warnings(&config, &answers) {
            eprintln!("edgeslice: warning: {w}");
        }
        println!(
            "edgeslice: the configuration file {} syntax is ok and the test is successful",
            cli.conf.display()
        );
        return ExitCode::SUCCESS;
    }
    let run = RunOptions {
        daemon: cli.daemon,
        upgrade: cli.upgrade,
    };
    match server::build(config, tls, run, cli.conf) {
        Ok(node) => node.run_forever(),
        Err(e) => {
            eprintln!("edgeslice: cannot start: {e}");
            ExitCode::from(1)
        }
    }
}
