//! The shim's pod network attach against a real network namespace, veth and tc (no VM):
//! what it reads, what it makes, and that release leaves nothing behind.

use std::path::Path;
use std::process::Command;

use kite_shim::config::NetworkMode;
use kite_vmm::net::{self as network, Attachment};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tc_ns(ns: &str, args: &[&str]) -> String {
    let out = Command::new("tc")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace with `eth0` (a veth whose peer stays on the host), an address, a gateway route
/// with an MTU and a permanent neighbour, as a CNI plugin would leave it.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("kite-nettest-{tag}-{}", std::process::id());
        let host_if = format!("knt{tag}{}", std::process::id() % 100000);
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "mtu", "1450", "up"]);
        ip(&["-n", &name, "addr", "add", "10.199.0.2/24", "dev", "eth0"]);
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            "10.199.0.1",
            "dev",
            "eth0",
            "mtu",
            "1400",
        ]);
        ip(&[
            "-n",
            &name,
            "neigh",
            "add",
            "10.199.0.9",
            "lladdr",
            "02:00:00:00:00:09",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        Netns { name, host_if }
    }

    fn path(&self) -> std::path::PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn attach_reads_the_namespace_and_release_leaves_nothing() {
    let ns = Netns::new("a");
    let dir = tempfile::tempdir().unwrap();
    let net = network::attach(
        "nettest",
        &ns.path(),
        dir.path(),
        NetworkMode::Tc,
        true,
        Path::new("/sys"),
    )
    .expect("attach");

    // What the guest is told.
    assert_eq!(net.guest.interfaces.len(), 1, "{:?}", net.guest);
    let eth0 = &net.guest.interfaces[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(eth0.mtu, 1450);
    let addrs: Vec<String> = eth0
        .addresses
        .iter()
        .map(|a| format!("{}/{}", a.address, a.prefix_len))
        .collect();
    assert_eq!(addrs, ["10.199.0.2/24"]);
    let default = net
        .guest
        .routes
        .iter()
        .find(|r| r.destination.is_empty())
        .expect("default route");
    assert_eq!(default.gateway, "10.199.0.1");
    assert_eq!(default.mtu, 1400);
    assert!(net
        .guest
        .routes
        .iter()
        .any(|r| r.destination == "10.199.0.0/24" && r.gateway.is_empty()));
    assert!(net
        .guest
        .neighbours
        .iter()
        .any(|n| n.address == "10.199.0.9" && n.mac == "02:00:00:00:00:09"));

    // What the host gets: a veth is no PCI function, so a tap with redirects both ways.
    assert_eq!(net.nics.len(), 1);
    assert_eq!(net.nics[0].mac, eth0.mac);
    let Attachment::Tap { tap } = &net.nics[0].attachment else {
        panic!("expected a tap: {:?}", net.nics[0]);
    };
    let link = ip(&["-n", &ns.name, "link", "show", tap]);
    assert!(link.contains("mtu 1450") && link.contains("UP"), "{link}");
    let to_tap = tc_ns(&ns.name, &["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        to_tap.contains("protocol all") && to_tap.contains(&format!("to device {tap}")),
        "eth0 ingress filters: {to_tap}"
    );
    let to_eth0 = tc_ns(&ns.name, &["filter", "show", "dev", tap, "ingress"]);
    assert!(
        to_eth0.contains("to device eth0"),
        "{tap} filters: {to_eth0}"
    );
    assert!(dir.path().join(network::STATE_FILE).exists());

    // The tap lives as long as its descriptor (QEMU's); release takes the rest.
    drop(net.tap_fds);
    let links = ip(&["-n", &ns.name, "link", "show"]);
    assert!(!links.contains(tap.as_str()), "{links}");
    network::release(dir.path(), Path::new("/sys"));
    let qdiscs = tc_ns(&ns.name, &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "left on eth0: {qdiscs}");
    assert!(!dir.path().join(network::STATE_FILE).exists());
    // Twice is harmless.
    network::release(dir.path(), Path::new("/sys"));
}

#[test]
fn a_missing_namespace_is_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let err = network::attach(
        "nettest",
        Path::new("/var/run/netns/kite-no-such-ns"),
        dir.path(),
        NetworkMode::Tc,
        true,
        Path::new("/sys"),
    )
    .err()
    .expect("attach must fail")
    .to_string();
    assert!(
        err.contains("nettest") && err.contains("kite-no-such-ns"),
        "{err}"
    );
    assert!(!dir.path().join(network::STATE_FILE).exists());
}

#[test]
fn macvtap_mode_makes_a_passthru_macvtap_and_release_removes_it() {
    let ns = Netns::new("m");
    let dir = tempfile::tempdir().unwrap();
    let net = network::attach(
        "nettest",
        &ns.path(),
        dir.path(),
        NetworkMode::Macvtap,
        true,
        Path::new("/sys"),
    )
    .expect("attach");
    assert_eq!(net.nics.len(), 1);
    let Attachment::Macvtap { link } = &net.nics[0].attachment else {
        panic!("expected a macvtap: {:?}", net.nics[0]);
    };
    assert_eq!(net.tap_fds.len(), 1, "the macvtap's device is open");
    let details = ip(&["-d", "-n", &ns.name, "link", "show", link]);
    assert!(
        details.contains("macvtap") && details.contains("mode passthru"),
        "{details}"
    );
    // No device node or sysfs mount is left in the sandbox dir.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != network::STATE_FILE)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&dir.path().display().to_string()));

    drop(net.tap_fds);
    network::release(dir.path(), Path::new("/sys"));
    let links = ip(&["-n", &ns.name, "link", "show"]);
    assert!(!links.contains(link.as_str()), "{links}");
}
