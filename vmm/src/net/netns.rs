//! Inside a pod's network namespace: entering it (a thread of its own), and reading its
//! interfaces, addresses, routes and neighbours over netlink.

use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::Path;

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
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{format_mac, NetnsError, OWN_PREFIX};
use crate::passthrough;

/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// A netlink failure, named by what was being done.
pub(super) fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetnsError {
    let what = what.into();
    move |source| NetnsError::Netlink { what, source }
}

/// An I/O failure, named by what was being done.
pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetnsError {
    let what = what.into();
    move |source| NetnsError::Io { what, source }
}

/// Runs `f` with a netlink handle inside the network namespace `netns`, on a thread of its
/// own (setns(2) changes only the calling thread's namespace, and the netlink socket and any
/// tap opened there belong to the namespace they were created in).
pub(super) fn in_netns<T, F, Fut>(netns: &Path, what: &str, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetnsError>>,
{
    let netns = netns.to_path_buf();
    let thread = std::thread::Builder::new()
        .name(format!("netns-{what}"))
        .spawn(move || {
            let ns = File::open(&netns).map_err(io("open"))?;
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| io("setns")(std::io::Error::from(e)))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io("start a runtime"))?;
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection().map_err(io("netlink"))?;
                let conn = tokio::spawn(conn);
                let result = f(handle).await;
                conn.abort();
                result
            })
        })
        .map_err(io("start a thread"))?;
    thread.join().unwrap_or(Err(NetnsError::Panicked))
}

/// An interface of the namespace as read over netlink.
#[derive(Clone, Debug)]
pub(super) struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// The PCI address of the device behind the interface, if it is a PCI function.
    pub pci: Option<String>,
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
    } else if msg.header.address_family == AddressFamily::Inet6 && r.gateway.is_empty() {
        // A default route on the link (`default dev eth0`) names no address: the empty
        // destination would read as IPv4's in the guest.
        r.destination = "::/0".into();
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

/// Reads the namespace's interfaces (not loopback, not kite's own), and what the guest needs to
/// be configured as the namespace is: addresses, routes, permanent neighbours.
pub(super) async fn read(h: &Handle) -> Result<(Vec<Link>, proto::NetworkConfig), NetnsError> {
    let links: Vec<Link> = h
        .link()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(netlink("list links"))?
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
        .map_err(netlink("list addresses"))?;
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
            .map_err(netlink("list routes"))?;
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
        .map_err(netlink("list neighbours"))?;
    guest.neighbours = neighbours
        .iter()
        .filter_map(|n| neighbour_from(n, &links))
        .collect();
    Ok((links, guest))
}

fn is_bound(path: &Path) -> bool {
    // nsfs's magic number (`statfs(2)`): what a bound namespace is.
    let nsfs = nix::sys::statfs::FsType(0x6e73_6673);
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nsfs)
        .unwrap_or(false)
}

/// A network namespace of its own, bound at `path` (made if `path` is not one already): a
/// thread unshares a new one and bind-mounts it (no process is forked for it).
pub(super) fn ensure_bound(path: &Path) -> Result<(), NetnsError> {
    if is_bound(path) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    File::create(path).map_err(io(format!("create {}", path.display())))?;
    let target = path.to_path_buf();
    std::thread::Builder::new()
        .name("netns-new".into())
        .spawn(move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| io("unshare a network namespace")(e.into()))?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| io(format!("bind the namespace at {}", target.display()))(e.into()))
        })
        .map_err(io("start a thread"))?
        .join()
        .unwrap_or(Err(NetnsError::Panicked))
}

/// Unbinds and removes the namespace [`ensure_bound`] made at `path`.
pub(super) fn remove_bound(path: &Path) {
    if is_bound(path) {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_file(path);
}

pub(super) async fn index_of(h: &Handle, name: &str) -> Option<u32> {
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
    fn an_ipv6_default_route_on_the_link_names_its_family() {
        let mut r = route(vec![RouteAttribute::Oif(2)], 0);
        r.header.address_family = AddressFamily::Inet6;
        assert_eq!(route_from(&r, &links()).unwrap().destination, "::/0");
        let v4 = route(vec![RouteAttribute::Oif(2)], 0);
        assert_eq!(route_from(&v4, &links()).unwrap().destination, "");
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
}
