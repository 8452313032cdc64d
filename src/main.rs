fn main() -> std::process::ExitCode {
    tailgate::cli::main()
}
