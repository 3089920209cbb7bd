//! containerd-shim-kite-v2: see the kite_shim library.

const HELP: &str = "\
containerd-shim-kite-v2 — kite's containerd shim v2 (runtime io.containerd.kite.v2)

containerd runs this binary; people do not. Each pod (or plain container) gets one shim
process, which boots the pod's QEMU microVM, shares the rootfs with virtio-fs, relays stdio and
reports exits. Use it through containerd:

    ctr run --rm --runtime io.containerd.kite.v2 IMAGE ID CMD...

or a Kubernetes RuntimeClass whose handler is `kite` (see the README).

Configuration: the [shim] section of /etc/kite/kite.toml (or the file named by KITE_CONFIG);
KITE_SHIM_ACCELERATOR=auto|kvm|tcg, KITE_SHIM_KERNEL, KITE_SHIM_INITRD,
KITE_SHIM_BOOT_TIMEOUT_SECS and KITE_SHIM_LOG override it.

Actions (containerd's shim v2 protocol): start, delete; -v prints the version.";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args
        .iter()
        .skip(1)
        .any(|a| a == "--help" || a == "-help" || a == "-h")
    {
        println!("{HELP}");
        return;
    }
    containerd_shim::asynchronous::run::<kite_shim::shim::KiteShim>(kite_shim::RUNTIME_NAME, None)
        .await;
}
