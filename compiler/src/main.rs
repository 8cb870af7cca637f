//! The `qcc` binary; the command line lives in `qcc::cli`.

fn main() -> std::process::ExitCode {
    qcc::cli::main()
}
