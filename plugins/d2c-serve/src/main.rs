fn main() {
    eprintln!("d2c-serve: not implemented yet (see issue: d2c-serve plugin)");
    std::process::exit(2);
}
