//! The `flowmap` binary: everything is in the library's `cli`.

fn main() -> std::process::ExitCode {
    flowmap::cli::main()
}
