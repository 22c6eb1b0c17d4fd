//! The `sluice` binary: broker server and command-line client.

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
