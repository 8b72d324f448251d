use clap::Parser;

fn main() -> std::process::ExitCode {
    let opts = d2c_serve::Options::parse();
    let runtime = match d2c_serve::runtime(&opts) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("d2c-serve: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // block_on polls `run` on this (the main) thread, which outlives the child llama-server:
    // its parent-death signal is tied to the spawning thread.
    match runtime.block_on(d2c_serve::run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("d2c-serve: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
