use std::io::Write;
use std::process::ExitCode;

use fanout::config::{Config, ConfigError};
use fanout::server::{raise_fd_limit, Server};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = match Config::from_args(std::env::args_os()) {
        Ok(config) => config,
        // Prints --help/--version to stdout and exits 0, or a usage error with 2.
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(ConfigError::File(message)) => {
            eprintln!("fanout: {message}");
            return ExitCode::from(2);
        }
    };
    if let Err(message) = config.validate() {
        eprintln!("fanout: {message}");
        return ExitCode::from(2);
    }
    match raise_fd_limit() {
        Ok(limit) => log::debug!("open file limit: {limit}"),
        Err(e) => log::warn!("could not read the open file limit: {e}"),
    }
    // Legitimate for /echo alone, but channels, chat and events would then
    // differ from process to process: say so once.
    let shares_without_redis = config.reuse_port && config.redis.is_none();
    let mut server = match Server::bind(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("fanout: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = server.handle_signals() {
        eprintln!("fanout: cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    for url in server.local_urls() {
        // Scripts and tests wait for this line to learn the port.
        // Not println!: a closed stdout must not take the server down.
        let _ = writeln!(std::io::stdout(), "fanout listening on {url}");
    }
    for line in server.describe_listeners() {
        if line.contains("every interface") {
            log::warn!("{line}");
        } else {
            log::info!("{line}");
        }
    }
    if shares_without_redis {
        log::warn!(
            "--reuse-port without --redis: the processes sharing these addresses do not \
             share channels, chat or events, so a client sees only its own process's; \
             give them all one --redis"
        );
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}
