fn main() {
    std::process::exit(cronpost::cli::main());
}
