use clap::Parser;

fn main() {
    let cli = bmr::cli::Cli::parse();
    match bmr::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: what is wrong and what to do.
            eprintln!("bmr: error: {e:#}");
            std::process::exit(1);
        }
    }
}
