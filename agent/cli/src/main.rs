//! The `ferry` binary: parses the command line and hands over to the `ferry-cli` library
//! (`ferry agent` runs the daemon; every other command is a client of a running agent).

fn main() -> std::process::ExitCode {
    ferry_cli::main()
}
