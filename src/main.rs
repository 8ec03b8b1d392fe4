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

/// glibc raises its mmap threshold each time a large block is freed, after which 1 MiB chunk
/// buffers come from the heap arenas, fragment them and are never given back: peak RSS under
/// many concurrent fills measured 289 MiB instead of 198 MiB (tests/memory_bound.rs). A fixed
/// threshold keeps every chunk-sized buffer in its own mapping, returned to the system when
/// freed. (Same as `MALLOC_MMAP_THRESHOLD_=131072`.)
///
/// glibc also gives each thread that contends for the heap an arena of its own (up to 8 per
/// core), and the blocking threads of disk I/O each fragment one. Two arenas: three runs of
/// tests/memory_bound.rs peaked at 218–239 MiB against 251–265 MiB with the default, but later
/// runs varied 221–280 MiB, so that test cannot tell the gain from its noise; kept as the
/// usual setting for a server whose memory must stay bounded. (Same as `MALLOC_ARENA_MAX=2`.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tunables; it is called first thing in main,
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_mmap_threshold() {}

fn main() -> ExitCode {
    fix_mmap_threshold();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let config = match Config::load_checked(&cli.conf) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}", config::error_report(&cli.conf, &e));
            return ExitCode::from(1);
        }
    };
    if cli.test {
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
    match server::build(config, run, cli.conf) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            eprintln!("edgeslice: cannot start: {e}");
            ExitCode::from(1)
        }
    }
}
