//! `edgeslice -c FILE` runs the proxy; `edgeslice -t -c FILE` checks the config and exits.

use clap::Parser;
use edgeslice::config::Config;
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let config = match Config::load(&cli.conf).and_then(|c| c.check_paths().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "edgeslice: configuration error in {}: {e}",
                cli.conf.display()
            );
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
    match server::build(config, run) {
        Ok(server) => server.run_forever(),
        Err(e) => {
            eprintln!("edgeslice: cannot start: {e}");
            ExitCode::from(1)
        }
    }
}
