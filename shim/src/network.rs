//! The pod's network, passed into its VM.
//!
//! The CNI plugins set up the pod's network namespace (for the bridge plugin a veth `eth0`
//! with the pod's IP). Before the VM starts, the shim reads every interface in that namespace
//! (MAC, MTU, addresses), its routes and permanent neighbours, and attaches each interface:
//!
//! - a PCI function (an ENI, an SR-IOV VF) is rebound to vfio-pci and handed to QEMU whole
//!   (see [`crate::passthrough`]), when `vfio_passthrough` is on;
//! - anything else gets a tap beside it and an ingress `mirred` redirect both ways (tc), so
//!   frames cross between the interface and the VM's virtio-net without touching the
//!   namespace's IP stack; or, with `network_mode = "macvtap"`, a passthru macvtap on it.
//!   The guest's NIC takes the interface's MAC, so the bridge's and the peers' ARP entries
//!   stay valid.
//!
//! The guest agent then names its NICs (found by MAC) as the namespace does and gives them the
//! same MTU, addresses, routes (with their MTU) and neighbours.
//!
//! Taps are not persistent: each lives as long as the descriptor QEMU holds, so a VM that
//! dies takes its taps and their qdiscs along. What outlives QEMU — the ingress qdisc on the
//! namespace's interface, a macvtap, a device bound to vfio-pci — is recorded in
//! `network.json` in the sandbox dir and released by [`release`], on shutdown and by
//! `shim delete` after a crash.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use kite_protocol::agent as proto;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::NetworkMode;
use crate::passthrough::{self, PciFunction};

/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;
/// Every interface kite makes in a pod's namespace is named so, and never attached itself.
const OWN_PREFIX: &str = "kite-";
const TAP_PREFIX: &str = "kite-tap";
const MACVTAP_PREFIX: &str = "kite-mvt";
/// The file in the sandbox dir that records what [`release`] must undo.
pub const STATE_FILE: &str = "network.json";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("sandbox {sandbox}: network namespace {netns}: {op}: {reason}")]
    Netns {
        sandbox: String,
        netns: PathBuf,
        op: String,
        reason: String,
    },
    #[error(transparent)]
    Passthrough(#[from] passthrough::PassthroughError),
}

/// How one interface of the namespace reaches the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Attachment {
    /// A tap in the namespace, tc-redirected to and from the interface.
    Tap { tap: String },
    /// A macvtap in passthru mode on top of the interface (it takes every frame the interface
    /// receives).
    Macvtap { link: String },
    /// The interface's PCI function, bound to vfio-pci; `host_driver` is rebound on release.
    Vfio { function: PciFunction },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedNic {
    /// The interface's name in the namespace (and in the guest).
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`: the guest's NIC has it.
    pub mac: String,
    pub attachment: Attachment,
}

/// What `network.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct NetworkState {
    netns: PathBuf,
    nics: Vec<AttachedNic>,
}

/// A pod's network, attached: the NICs for QEMU and the configuration for the guest.
pub struct PodNetwork {
    pub netns: PathBuf,
    pub nics: Vec<AttachedNic>,
    /// The tap and macvtap descriptors, in the order of those entries of `nics`; QEMU
    /// inherits them.
    pub tap_fds: Vec<OwnedFd>,
    pub guest: proto::NetworkConfig,
}

/// The network namespace a container's OCI spec names, if it names one by path.
pub fn netns_path(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        .and_then(|n| n.path().clone())
        .filter(|p| !p.as_os_str().is_empty())
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An interface of the namespace as read over netlink.
#[derive(Clone, Debug)]
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    mtu: u32,
    /// The PCI address of the device behind the interface, if it is a PCI function.
    pci: Option<String>,
}

fn link_from(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = 1500;
    let (mut parent, mut bus) = (None, None);
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::ParentDevName(p) => parent = Some(p.clone()),
            LinkAttribute::ParentDevBusName(b) => bus = Some(b.clone()),
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) => mac = Some(a.clone()),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let name = name?;
    let mac = mac.filter(|m| m.len() == 6 && m.iter().any(|b| *b != 0))?;
    if msg.header.flags.contains(LinkFlags::Loopback) || name.starts_with(OWN_PREFIX) {
        return None;
    }
    Some(Link {
        index: msg.header.index,
        name,
        mac,
        mtu,
        pci: parent.filter(|p| bus.as_deref() == Some("pci") && passthrough::valid_address(p)),
    })
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The guest's view of a route, if it is one the guest needs: unicast, in the main table, on
/// one of the attached interfaces, and not the IPv6 link-local or multicast ones every
/// interface has anyway.
fn route_from(msg: &RouteMessage, links: &[Link]) -> Option<proto::Route> {
    if msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut r = proto::Route::new();
    let mut dest = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dest = route_ip(a),
            RouteAttribute::Gateway(a) => r.gateway = route_ip(a)?.to_string(),
            RouteAttribute::PrefSource(a) => r.source = route_ip(a)?.to_string(),
            RouteAttribute::Oif(i) => {
                r.device = links.iter().find(|l| l.index == *i)?.name.clone();
            }
            RouteAttribute::Metrics(m) => {
                for metric in m {
                    if let RouteMetric::Mtu(mtu) = metric {
                        r.mtu = *mtu;
                    }
                }
            }
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN || r.device.is_empty() {
        return None;
    }
    if let Some(d) = dest {
        if is_link_local(&d) && !d.is_ipv4() || matches!(d, IpAddr::V6(v6) if v6.is_multicast()) {
            return None;
        }
        r.destination = format!("{d}/{}", msg.header.destination_prefix_length);
    }
    Some(r)
}

fn neighbour_from(msg: &NeighbourMessage, links: &[Link]) -> Option<proto::Neighbour> {
    if msg.header.state != NeighbourState::Permanent {
        return None;
    }
    let device = links.iter().find(|l| l.index == msg.header.ifindex)?;
    let mut n = proto::Neighbour::new();
    n.device = device.name.clone();
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                n.address = v4.to_string()
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                n.address = v6.to_string()
            }
            NeighbourAttribute::LinkLayerAddress(mac) if mac.len() == 6 => n.mac = format_mac(mac),
            _ => {}
        }
    }
    (!n.address.is_empty() && !n.mac.is_empty()).then_some(n)
}

/// Runs `f` with a netlink handle inside the network namespace `netns`, on a thread of its
/// own (setns(2) changes only the calling thread's namespace, and the netlink socket and any
/// tap opened there belong to the namespace they were created in).
fn in_netns<T, F, Fut>(netns: &Path, what: &str, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let netns = netns.to_path_buf();
    let thread = std::thread::Builder::new()
        .name(format!("netns-{what}"))
        .spawn(move || {
            let ns = File::open(&netns).map_err(|e| format!("open: {e}"))?;
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("runtime: {e}"))?;
            rt.block_on(async move {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
                let conn = tokio::spawn(conn);
                let result = f(handle).await;
                conn.abort();
                result
            })
        })
        .map_err(|e| format!("thread: {e}"))?;
    thread
        .join()
        .unwrap_or_else(|_| Err("netns thread panicked".into()))
}

/// Reads the namespace `netns` and attaches its interfaces (see the module docs).
/// `sandbox_dir` receives `network.json` before anything is changed, so a crash at any point
/// leaves a record for [`release`].
pub fn attach(
    sandbox: &str,
    netns: &Path,
    sandbox_dir: &Path,
    mode: NetworkMode,
    vfio_passthrough: bool,
    sysfs: &Path,
) -> Result<PodNetwork, NetworkError> {
    let fail = |op: &str, reason: String| NetworkError::Netns {
        sandbox: sandbox.to_string(),
        netns: netns.to_path_buf(),
        op: op.to_string(),
        reason,
    };
    let (links, guest) = in_netns(netns, "read", |h| async move { read_netns(&h).await })
        .map_err(|e| fail("read", e))?;

    // Decide each interface's attachment. The PCI address comes from netlink (the link's
    // parent device): the shim's /sys/class/net shows the host's namespace, not the pod's.
    let mut plan = Vec::new();
    for link in &links {
        let function = match (&link.pci, vfio_passthrough) {
            (Some(address), true) => Some(passthrough::probe(sysfs, address)?),
            _ => None,
        };
        plan.push((link.clone(), function));
    }
    let nics: Vec<AttachedNic> = plan
        .iter()
        .enumerate()
        .map(|(i, (link, function))| AttachedNic {
            name: link.name.clone(),
            mac: format_mac(&link.mac),
            attachment: match function {
                Some(f) => Attachment::Vfio {
                    function: f.clone(),
                },
                None if mode == NetworkMode::Macvtap => Attachment::Macvtap {
                    link: format!("{MACVTAP_PREFIX}{i}"),
                },
                None => Attachment::Tap {
                    tap: format!("{TAP_PREFIX}{i}"),
                },
            },
        })
        .collect();
    let state = NetworkState {
        netns: netns.to_path_buf(),
        nics: nics.clone(),
    };
    let state_path = sandbox_dir.join(STATE_FILE);
    std::fs::write(
        &state_path,
        serde_json::to_vec(&state).expect("network state serializes"),
    )
    .map_err(|e| fail("record", format!("{}: {e}", state_path.display())))?;

    let result = attach_all(sandbox, netns, sandbox_dir, sysfs, &plan, &nics);
    match result {
        Ok(tap_fds) => {
            info!(sandbox, netns = %netns.display(), nics = nics.len(), "pod network attached");
            Ok(PodNetwork {
                netns: netns.to_path_buf(),
                nics,
                tap_fds,
                guest,
            })
        }
        Err(e) => {
            release(sandbox_dir, sysfs);
            Err(e)
        }
    }
}

fn attach_all(
    sandbox: &str,
    netns: &Path,
    sandbox_dir: &Path,
    sysfs: &Path,
    plan: &[(Link, Option<PciFunction>)],
    nics: &[AttachedNic],
) -> Result<Vec<OwnedFd>, NetworkError> {
    let mut in_ns = Vec::new();
    for ((link, _), nic) in plan.iter().zip(nics) {
        match &nic.attachment {
            Attachment::Vfio { function } => passthrough::bind_vfio(sysfs, function)?,
            other => in_ns.push((link.clone(), other.clone())),
        }
    }
    if in_ns.is_empty() {
        return Ok(Vec::new());
    }
    let sandbox_owned = sandbox.to_string();
    let node_dir = sandbox_dir.to_path_buf();
    in_netns(netns, "attach", move |h| async move {
        let mut fds = Vec::new();
        for (link, attachment) in in_ns {
            let fd = match attachment {
                Attachment::Tap { tap } => {
                    let fd =
                        open_tap(&tap).map_err(|e| format!("{}: tap {tap}: {e}", link.name))?;
                    redirect(&h, &link, &tap)
                        .await
                        .map_err(|e| format!("{}: {e}", link.name))?;
                    fd
                }
                Attachment::Macvtap { link: name } => macvtap(&h, &link, &name, &node_dir)
                    .await
                    .map_err(|e| format!("{}: macvtap {name}: {e}", link.name))?,
                Attachment::Vfio { .. } => unreachable!("VFIO functions are bound above"),
            };
            fds.push(fd);
        }
        Ok(fds)
    })
    .map_err(|reason| NetworkError::Netns {
        sandbox: sandbox_owned,
        netns: netns.to_path_buf(),
        op: "attach".into(),
        reason,
    })
}

/// Makes a passthru macvtap `name` on `link` and opens its character device.
///
/// The device's number is in sysfs under the macvtap, and the shim's /sys shows the host's
/// namespace: this (per-thread) mount namespace gets a sysfs of the pod's network namespace.
/// The device node is made in `node_dir`, opened and removed again.
async fn macvtap(h: &Handle, link: &Link, name: &str, node_dir: &Path) -> Result<OwnedFd, String> {
    use rtnetlink::packet_route::link::MacVtapMode;
    h.link()
        .add(
            rtnetlink::LinkMacVtap::new(name, link.index, MacVtapMode::Passthrough)
                .mtu(link.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| format!("create: {e}"))?;
    let index = h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(|e| format!("find: {e}"))?
        .ok_or("vanished")?
        .header
        .index;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare mounts: {e}"))?;
    let none: Option<&str> = None;
    nix::mount::mount(
        none,
        "/",
        none,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        none,
    )
    .map_err(|e| format!("make mounts private: {e}"))?;
    let sys = node_dir.join(format!("sysfs-{name}"));
    std::fs::create_dir_all(&sys).map_err(|e| format!("{}: {e}", sys.display()))?;
    nix::mount::mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        nix::mount::MsFlags::empty(),
        none,
    )
    .map_err(|e| format!("mount sysfs: {e}"))?;
    let dev_file = sys.join(format!("class/net/{name}/macvtap/tap{index}/dev"));
    let numbers = std::fs::read_to_string(&dev_file);
    let _ = nix::mount::umount2(&sys, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&sys);
    let numbers = numbers.map_err(|e| format!("{}: {e}", dev_file.display()))?;
    let (major, minor) = numbers
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| format!("{}: {numbers:?}", dev_file.display()))?;
    let node = node_dir.join(format!("{name}.dev"));
    let _ = std::fs::remove_file(&node);
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(major, minor),
    )
    .map_err(|e| format!("mknod {}: {e}", node.display()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node);
    let _ = std::fs::remove_file(&node);
    let file = file.map_err(|e| format!("open {}: {e}", node.display()))?;
    set_vnet_hdr(&file).map_err(|e| format!("vnet header: {e}"))?;
    Ok(OwnedFd::from(file))
}

async fn read_netns(h: &Handle) -> Result<(Vec<Link>, proto::NetworkConfig), String> {
    let links: Vec<Link> = h
        .link()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| format!("list links: {e}"))?
        .iter()
        .filter_map(link_from)
        .collect();
    let mut guest = proto::NetworkConfig::new();
    let addresses = h
        .address()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| format!("list addresses: {e}"))?;
    for link in &links {
        let mut iface = proto::Interface::new();
        iface.name = link.name.clone();
        iface.mac = format_mac(&link.mac);
        iface.mtu = link.mtu;
        for a in addresses.iter().filter(|a| a.header.index == link.index) {
            // IFA_LOCAL is the interface's own address on IPv4 (IFA_ADDRESS can be a peer's);
            // IPv6 has only IFA_ADDRESS.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr.filter(|ip| !is_link_local(ip)) {
                let mut pa = proto::IpAddress::new();
                pa.address = ip.to_string();
                pa.prefix_len = u32::from(a.header.prefix_len);
                iface.addresses.push(pa);
            }
        }
        guest.interfaces.push(iface);
    }
    for builder in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let routes = h
            .route()
            .get(builder)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| format!("list routes: {e}"))?;
        guest
            .routes
            .extend(routes.iter().filter_map(|r| route_from(r, &links)));
    }
    let neighbours = h
        .neighbours()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| format!("list neighbours: {e}"))?;
    guest.neighbours = neighbours
        .iter()
        .filter_map(|n| neighbour_from(n, &links))
        .collect();
    Ok((links, guest))
}

/// `protocol all` for a tc filter: ETH_P_ALL in network byte order.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();

fn ignore_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}

/// Brings `tap` up with `link`'s MTU and redirects every frame arriving on either to the
/// other (ingress qdisc, u32 match-all filter, mirred egress redirect).
async fn redirect(h: &Handle, link: &Link, tap: &str) -> Result<(), String> {
    let tap_index = index_of(h, tap)
        .await
        .ok_or_else(|| format!("{tap} vanished"))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(link.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| format!("set {tap} up: {e}"))?;
    for (from, to) in [(link.index, tap_index), (tap_index, link.index)] {
        ignore_exists(h.qdisc().add(from as i32).ingress().execute().await)
            .map_err(|e| format!("ingress qdisc on {from}: {e}"))?;
        h.traffic_filter(from as i32)
            .add()
            .parent(0xffff_0000)
            .protocol(PROTOCOL_ALL)
            .redirect(to)
            .map_err(|e| format!("redirect filter {from} -> {to}: {e}"))?
            .execute()
            .await
            .map_err(|e| format!("redirect filter {from} -> {to}: {e}"))?;
    }
    Ok(())
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// TUNSETIFF: names (tun) and sets the flags of a tun/tap or macvtap descriptor.
fn set_iff(file: &File, name: &str) -> std::io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other("interface name too long"));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: TAP_FLAGS as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq, which IfReq lays out (name, then the flags in
    // the union, padded to the full 40 bytes); `req` outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Turns on virtio-net headers on a macvtap (its name is fixed; TUNSETIFF sets the flags).
fn set_vnet_hdr(file: &File) -> std::io::Result<()> {
    set_iff(file, "")
}

/// Opens a new (non-persistent) tap named `name` in the calling thread's network namespace,
/// with virtio-net headers so QEMU can pass offloads through. (std opens files close-on-exec:
/// only QEMU, which is told to, inherits it.)
///
/// Written here rather than taken from a tun crate: it is one ioctl, and the crates that wrap it
/// also configure addresses and routes, which the tc redirect must not have.
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    set_iff(&file, name)?;
    Ok(OwnedFd::from(file))
}

/// Undoes what `network.json` in `sandbox_dir` records: removes the ingress qdiscs kite added
/// (with their filters) and any tap still there, and gives passed-through devices back to their
/// host drivers. Safe to call twice, and when the namespace is already gone (it took
/// everything in it along).
pub fn release(sandbox_dir: &Path, sysfs: &Path) {
    let path = sandbox_dir.join(STATE_FILE);
    let Ok(text) = std::fs::read(&path) else {
        return;
    };
    let Ok(state) = serde_json::from_slice::<NetworkState>(&text) else {
        warn!("{}: unreadable, nothing released", path.display());
        return;
    };
    for nic in &state.nics {
        if let Attachment::Vfio { function } = &nic.attachment {
            if let Err(e) = passthrough::rebind_host(sysfs, function) {
                warn!("{}: {e}", nic.name);
            }
        }
    }
    // (the namespace's interface, the link kite made beside it)
    let names: Vec<(String, String)> = state
        .nics
        .iter()
        .filter_map(|n| match &n.attachment {
            Attachment::Tap { tap } => Some((n.name.clone(), tap.clone())),
            Attachment::Macvtap { link } => Some((n.name.clone(), link.clone())),
            Attachment::Vfio { .. } => None,
        })
        .collect();
    if !names.is_empty() && state.netns.exists() {
        let r = in_netns(&state.netns, "release", move |h| async move {
            for (name, own) in names {
                if let Some(index) = index_of(&h, &own).await {
                    let _ = h.link().del(index).execute().await;
                }
                let Some(index) = index_of(&h, &name).await else {
                    continue;
                };
                let mut del = h.qdisc().del(index as i32);
                del.message_mut().header.parent = TcHandle::INGRESS;
                del.message_mut().header.handle = TcHandle::from(0xffff_0000);
                if let Err(e) = del.execute().await {
                    let gone = matches!(&e, rtnetlink::Error::NetlinkError(m)
                        if m.raw_code() == -libc::ENOENT || m.raw_code() == -libc::EINVAL);
                    if !gone {
                        return Err(format!("{name}: remove ingress qdisc: {e}"));
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = r {
            warn!(netns = %state.netns.display(), "release pod network: {e}");
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn index_of(h: &Handle, name: &str) -> Option<u32> {
    h.link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|l| l.header.index)
}

/// The QEMU arguments (netdev and device) for the attached NICs, given the descriptors QEMU
/// inherits for the taps (in order).
pub fn qemu_nic_args(nics: &[AttachedNic], tap_fds: &[i32], pci: bool) -> Vec<String> {
    let mut args = Vec::new();
    let mut fds = tap_fds.iter();
    for (i, nic) in nics.iter().enumerate() {
        match &nic.attachment {
            Attachment::Tap { .. } | Attachment::Macvtap { .. } => {
                let Some(fd) = fds.next() else { break };
                args.push("-netdev".into());
                args.push(format!("tap,id=net{i},fd={fd}"));
                args.push("-device".into());
                args.push(format!(
                    "virtio-net-{},netdev=net{i},mac={}",
                    if pci { "pci" } else { "device" },
                    nic.mac
                ));
            }
            Attachment::Vfio { function } => {
                args.push("-device".into());
                args.push(format!("vfio-pci,host={}", function.address));
            }
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::RouteHeader;

    fn links() -> Vec<Link> {
        vec![Link {
            index: 2,
            name: "eth0".into(),
            mac: vec![0x02, 0, 0, 0, 0, 1],
            mtu: 1450,
            pci: None,
        }]
    }

    fn route(attrs: Vec<RouteAttribute>, prefix: u8) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header = RouteHeader {
            table: RT_TABLE_MAIN as u8,
            kind: RouteType::Unicast,
            destination_prefix_length: prefix,
            ..RouteHeader::default()
        };
        m.attributes = attrs;
        m
    }

    #[test]
    fn default_route_keeps_gateway_device_and_mtu() {
        let r = route(
            vec![
                RouteAttribute::Gateway(RouteAddress::Inet("10.88.0.1".parse().unwrap())),
                RouteAttribute::Oif(2),
                RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)]),
            ],
            0,
        );
        let g = route_from(&r, &links()).unwrap();
        assert_eq!(g.destination, "");
        assert_eq!(g.gateway, "10.88.0.1");
        assert_eq!(g.device, "eth0");
        assert_eq!(g.mtu, 1400);
    }

    #[test]
    fn routes_elsewhere_are_not_the_guests() {
        let other_if = route(
            vec![
                RouteAttribute::Destination(RouteAddress::Inet("10.1.0.0".parse().unwrap())),
                RouteAttribute::Oif(9),
            ],
            16,
        );
        assert!(route_from(&other_if, &links()).is_none());
        let mut local = route(vec![RouteAttribute::Oif(2)], 32);
        local.header.table = 255;
        assert!(route_from(&local, &links()).is_none());
        let ll = route(
            vec![
                RouteAttribute::Destination(RouteAddress::Inet6("fe80::".parse().unwrap())),
                RouteAttribute::Oif(2),
            ],
            64,
        );
        assert!(route_from(&ll, &links()).is_none());
        let subnet = route(
            vec![
                RouteAttribute::Destination(RouteAddress::Inet("10.88.0.0".parse().unwrap())),
                RouteAttribute::Oif(2),
                RouteAttribute::PrefSource(RouteAddress::Inet("10.88.0.5".parse().unwrap())),
            ],
            16,
        );
        let g = route_from(&subnet, &links()).unwrap();
        assert_eq!(g.destination, "10.88.0.0/16");
        assert_eq!(g.source, "10.88.0.5");
        assert!(g.gateway.is_empty());
    }

    #[test]
    fn nic_arguments_follow_the_attachments() {
        let nics = vec![
            AttachedNic {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                attachment: Attachment::Tap {
                    tap: "kite-tap0".into(),
                },
            },
            AttachedNic {
                name: "eth1".into(),
                mac: "02:00:00:00:00:02".into(),
                attachment: Attachment::Vfio {
                    function: PciFunction {
                        address: "0000:00:05.0".into(),
                        host_driver: "ixgbevf".into(),
                        iommu_group: "12".into(),
                    },
                },
            },
        ];
        let args = qemu_nic_args(&nics, &[7], false).join(" ");
        assert_eq!(
            args,
            "-netdev tap,id=net0,fd=7 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01 \
             -device vfio-pci,host=0000:00:05.0"
        );
    }

    #[test]
    fn netns_comes_from_the_spec() {
        let spec: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"},
               {"type":"network","path":"/var/run/netns/cni-1"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            netns_path(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        let fresh: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"network"}]}}"#,
        )
        .unwrap();
        assert_eq!(netns_path(&fresh), None);
    }
}
