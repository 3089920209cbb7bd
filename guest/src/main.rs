fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The warm-up container's command (see `warm_up`): PID 1 of its own namespace, so this
    // comes before the PID 1 check.
    if args.get(1).map(String::as_str) == Some(kite_guest::warm_up::EXIT_ARG) {
        std::process::exit(0);
    }
    if args.get(1).map(String::as_str) == Some("runtime") {
        std::process::exit(kite_guest::runtime::helper_main(&args[1..]));
    }
    if std::process::id() != 1 {
        eprintln!(
            "kite-guest is the init (PID 1) of a kite microVM; it is put into the guest initrd by \
             hack/build-guest.sh and is not run on the host."
        );
        std::process::exit(2);
    }
    kite_guest::init::run();
}
