//! `xlb`: the daemon and its command-line client (see `lb_userspace::cli`).

fn main() -> std::process::ExitCode {
    lb_userspace::cli::main()
}
