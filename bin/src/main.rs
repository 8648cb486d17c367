//! careflow-sip command line entry point; the work is in the library.

fn main() -> std::process::ExitCode {
    careflow_sip::main()
}
