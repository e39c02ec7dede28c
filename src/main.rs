//! The `imgvault` command: parses arguments, calls the library, prints, and maps errors to
//! exit codes (the only place that does).

mod cli;

use clap::Parser;

fn main() {
    // Die quietly on a closed pipe (`imgvault list --json | head`) like other Unix tools,
    // instead of panicking in println!.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMGVAULT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let code = match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("imgvault: error: {err:#}");
            exit_code(&err)
        }
    };
    std::process::exit(code);
}

/// Library errors carry their own code; anything else is a general failure.
fn exit_code(err: &anyhow::Error) -> i32 {
    err.chain()
        .find_map(|e| e.downcast_ref::<imgvault::Error>())
        .map_or(imgvault::error::exit::FAILURE, |e| e.exit_code())
}
