//! `vit-msn`: compile ViT-MSN checkpoints into TorchScript bundles and run them.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Output piped into `head` and closed early ends the program quietly, as
    // for other Unix tools, instead of a panic in println!.
    // SAFETY: restoring the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: libtorch's own messages carry backtraces after the first.
            let message = e.to_string();
            eprintln!(
                "error: {}",
                message.lines().next().unwrap_or("unknown error")
            );
            ExitCode::from(if e.is::<cli::Usage>() { 2 } else { 1 })
        }
    }
}
