fn main() {
    let args: Vec<String> = std::env::args().collect();
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
