//! The guest's network: loopback at boot, and the pod's NICs as the shim describes them
//! (`ConfigureNetwork`): each NIC, found by MAC, gets the name, MTU and addresses the pod's
//! network namespace has, then the routes (on-link ones first, so gateways resolve) and the
//! permanent neighbours.

use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use kite_protocol::agent::NetworkConfig;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteMetric;
use rtnetlink::packet_route::route::{RouteAttribute, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// How long a NIC may take to appear (its driver probes as the VM boots).
const NIC_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("interface {name} ({mac}): {reason}")]
    Interface {
        name: String,
        mac: String,
        reason: String,
    },
    #[error("{what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
}

fn connect() -> Result<Handle, NetworkError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetworkError::Netlink(e.to_string()))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// What a `ConfigureNetwork` request may hold: more is refused, not applied in part.
pub const MAX_INTERFACES: usize = 16;
pub const MAX_ROUTES: usize = 256;
pub const MAX_NEIGHBOURS: usize = 256;

fn invalid(what: &'static str, value: &str, reason: impl Into<String>) -> NetworkError {
    NetworkError::Invalid {
        what,
        value: value.into(),
        reason: reason.into(),
    }
}

fn parse_ip(what: &'static str, s: &str) -> Result<IpAddr, NetworkError> {
    s.parse()
        .map_err(|e: std::net::AddrParseError| invalid(what, s, e.to_string()))
}

/// Six bytes of two hex digits each, colon-separated (`02:42:0a:58:00:05`).
fn parse_mac(s: &str) -> Result<[u8; 6], NetworkError> {
    let bad = || invalid("MAC", s, "not six hex bytes");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        // from_str_radix alone would take "+f" and "f".
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    match parts.next() {
        None => Ok(mac),
        Some(_) => Err(bad()),
    }
}

/// A prefix length that fits `ip`'s family.
fn check_prefix(what: &'static str, value: &str, ip: IpAddr, len: u32) -> Result<u8, NetworkError> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match u8::try_from(len) {
        Ok(l) if len <= max => Ok(l),
        _ => Err(invalid(
            what,
            value,
            format!("prefix length {len} over {max}"),
        )),
    }
}

/// A CIDR (`10.88.0.0/16`), or the default route for "".
fn parse_cidr(s: &str, v6: bool) -> Result<(IpAddr, u8), NetworkError> {
    if s.is_empty() {
        let any = if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        };
        return Ok((any, 0));
    }
    let what = "route destination";
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| invalid(what, s, "no prefix length"))?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(what, s, "bad prefix length"));
    }
    let len: u32 = len
        .parse()
        .map_err(|_| invalid(what, s, "bad prefix length"))?;
    let ip = parse_ip(what, ip)?;
    Ok((ip, check_prefix(what, s, ip, len)?))
}

/// An interface name the kernel takes (`dev_valid_name`): 1 to 15 bytes, no `/`, `:` or
/// white space, not `.` or `..`.
fn check_link_name(what: &'static str, name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(invalid(what, name, "not an interface name"))
    }
}

fn check_mtu(what: &'static str, value: &str, mtu: u32) -> Result<(), NetworkError> {
    // 0 keeps the link's own; IPv4 needs 68, the kernel takes up to 65535 for these links.
    if mtu == 0 || (68..=65535).contains(&mtu) {
        Ok(())
    } else {
        Err(invalid(what, value, format!("MTU {mtu} out of 68..=65535")))
    }
}

/// One NIC of the pod: found by `current` (a pooled VM's own MAC) or `mac`, then renamed,
/// given `mac`, the MTU and the addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePlan {
    pub name: String,
    pub mac: [u8; 6],
    pub mac_text: String,
    pub current: [u8; 6],
    pub current_text: String,
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    pub device: String,
    pub destination: (IpAddr, u8),
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub mtu: u32,
    /// For errors: the request's own words.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourPlan {
    pub device: String,
    pub address: IpAddr,
    pub mac: [u8; 6],
}

/// A `ConfigureNetwork` request, checked whole before anything changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkPlan {
    pub interfaces: Vec<InterfacePlan>,
    /// On-link routes first: a gateway must be reachable before a route through it is added.
    pub routes: Vec<RoutePlan>,
    pub neighbours: Vec<NeighbourPlan>,
}

/// Checks and parses a `ConfigureNetwork` request (sizes, names, MACs, addresses, prefix
/// lengths, MTUs, address families): a bad one is refused before the guest changes.
pub fn plan(config: &NetworkConfig) -> Result<NetworkPlan, NetworkError> {
    let count = |what: &'static str, n: usize, max: usize| {
        if n > max {
            Err(invalid(what, &n.to_string(), format!("more than {max}")))
        } else {
            Ok(())
        }
    };
    count("interfaces", config.interfaces.len(), MAX_INTERFACES)?;
    count("routes", config.routes.len(), MAX_ROUTES)?;
    count("neighbours", config.neighbours.len(), MAX_NEIGHBOURS)?;
    let mut plan = NetworkPlan::default();
    for iface in &config.interfaces {
        check_link_name("interface name", &iface.name)?;
        check_mtu("interface", &iface.name, iface.mtu)?;
        let mac = parse_mac(&iface.mac)?;
        // A VM booted before its pod has a NIC with a MAC of its own: found by that one, it
        // takes the pod's.
        let current_text = if iface.current_mac.is_empty() {
            iface.mac.clone()
        } else {
            iface.current_mac.clone()
        };
        let current = parse_mac(&current_text)?;
        count("addresses", iface.addresses.len(), MAX_ROUTES)?;
        let mut addresses = Vec::with_capacity(iface.addresses.len());
        for a in &iface.addresses {
            let ip = parse_ip("address", &a.address)?;
            addresses.push((ip, check_prefix("address", &a.address, ip, a.prefix_len)?));
        }
        plan.interfaces.push(InterfacePlan {
            name: iface.name.clone(),
            mac,
            mac_text: iface.mac.clone(),
            current,
            current_text,
            mtu: iface.mtu,
            addresses,
        });
    }
    // Routes and neighbours are the pod's interfaces' (the shim leaves loopback out).
    let names: Vec<String> = plan.interfaces.iter().map(|i| i.name.clone()).collect();
    let known = |what: &'static str, device: &str| {
        check_link_name(what, device)?;
        if names.iter().any(|n| n == device) {
            Ok(())
        } else {
            Err(invalid(
                what,
                device,
                "not an interface of this configuration",
            ))
        }
    };
    for r in &config.routes {
        known("route device", &r.device)?;
        check_mtu("route device", &r.device, r.mtu)?;
        let v6 = r.destination.contains(':') || r.gateway.contains(':');
        let destination = parse_cidr(&r.destination, v6)?;
        let gateway = if r.gateway.is_empty() {
            None
        } else {
            Some(parse_ip("gateway", &r.gateway)?)
        };
        if gateway.is_some_and(|g| g.is_ipv4() != destination.0.is_ipv4()) {
            return Err(invalid(
                "gateway",
                &r.gateway,
                format!("not of the family of {:?}", r.destination),
            ));
        }
        let source = if r.source.is_empty() {
            None
        } else {
            Some(parse_ip("source", &r.source)?)
        };
        if source.is_some_and(|s| s.is_ipv4() != destination.0.is_ipv4()) {
            return Err(invalid(
                "source",
                &r.source,
                format!("not of the family of {:?}", r.destination),
            ));
        }
        plan.routes.push(RoutePlan {
            device: r.device.clone(),
            destination,
            gateway,
            source,
            mtu: r.mtu,
            text: format!("{:?} via {:?}", r.destination, r.gateway),
        });
    }
    plan.routes.sort_by_key(|r| r.gateway.is_some());
    for n in &config.neighbours {
        known("neighbour device", &n.device)?;
        plan.neighbours.push(NeighbourPlan {
            device: n.device.clone(),
            address: parse_ip("neighbour", &n.address)?,
            mac: parse_mac(&n.mac)?,
        });
    }
    Ok(plan)
}

fn mac_of(msg: &LinkMessage) -> Option<&[u8]> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

fn ignore_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}

async fn link_index(h: &Handle, name: &str) -> Result<u32, NetworkError> {
    h.link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(|e| NetworkError::Netlink(format!("find {name}: {e}")))?
        .map(|l| l.header.index)
        .ok_or_else(|| NetworkError::Netlink(format!("no interface {name}")))
}

/// Brings the loopback interface up (containers share the guest's network: a pod's localhost).
pub async fn loopback_up() -> Result<(), NetworkError> {
    let h = connect()?;
    let lo = link_index(&h, "lo").await?;
    h.link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(|e| NetworkError::Netlink(format!("lo up: {e}")))
}

/// The index of the link with one of `macs` (tried in order), waiting up to [`NIC_WAIT`].
async fn find_by_mac(h: &Handle, macs: &[&[u8]]) -> Result<Option<u32>, NetworkError> {
    let deadline = tokio::time::Instant::now() + NIC_WAIT;
    loop {
        let links: Vec<LinkMessage> = h
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetworkError::Netlink(format!("list links: {e}")))?;
        for mac in macs {
            if let Some(l) = links.iter().find(|l| mac_of(l) == Some(*mac)) {
                return Ok(Some(l.header.index));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn configure(config: &NetworkConfig) -> Result<(), NetworkError> {
    let plan = plan(config)?;
    let h = connect()?;
    for iface in &plan.interfaces {
        let ierr = |reason: String| NetworkError::Interface {
            name: iface.name.clone(),
            mac: iface.mac_text.clone(),
            reason,
        };
        // Found by the pod's MAC too: a configuration retried after the NIC took it.
        let index = find_by_mac(&h, &[&iface.current[..], &iface.mac[..]])
            .await?
            .ok_or_else(|| {
                ierr(format!(
                    "no NIC with MAC {} within {NIC_WAIT:?}",
                    iface.current_text
                ))
            })?;
        // A link is renamed only while it is down.
        h.link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(|e| ierr(format!("down: {e}")))?;
        let mut set = LinkUnspec::new_with_index(index).name(iface.name.clone());
        if iface.current != iface.mac {
            // virtio-net tells QEMU, whose receive filter follows.
            set = set.address(iface.mac.to_vec());
        }
        if iface.mtu > 0 {
            set = set.mtu(iface.mtu);
        }
        h.link()
            .set(set.up().build())
            .execute()
            .await
            .map_err(|e| ierr(format!("rename, MTU {}, up: {e}", iface.mtu)))?;
        for &(ip, len) in &iface.addresses {
            ignore_exists(h.address().add(index, ip, len).execute().await)
                .map_err(|e| ierr(format!("address {ip}/{len}: {e}")))?;
        }
    }
    for r in &plan.routes {
        let rerr = |e: String| NetworkError::Interface {
            name: r.device.clone(),
            mac: String::new(),
            reason: format!("route {}: {e}", r.text),
        };
        let index = link_index(&h, &r.device).await?;
        let (dest, len) = r.destination;
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dest, len)
            .map_err(|e| rerr(e.to_string()))?
            .output_interface(index);
        if let Some(gateway) = r.gateway {
            b = b.gateway(gateway).map_err(|e| rerr(e.to_string()))?;
        }
        if let Some(source) = r.source {
            b = b.pref_source(source).map_err(|e| rerr(e.to_string()))?;
        }
        let mut msg = b.build();
        if r.gateway.is_none() {
            // On the link: a gateway behind this route must be reachable through it, which the
            // kernel allows only for link-scope routes.
            msg.header.scope = RouteScope::Link;
        }
        if r.mtu > 0 {
            msg.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(r.mtu)]));
        }
        // Replace: the kernel already made the on-link route of each address, without the MTU
        // the namespace's route may carry.
        h.route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| rerr(e.to_string()))?;
    }
    for n in &plan.neighbours {
        let index = link_index(&h, &n.device).await?;
        h.neighbours()
            .add(index, n.address)
            .link_layer_address(&n.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| NetworkError::Netlink(format!("neighbour {}: {e}", n.address)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_cidrs_parse() {
        assert_eq!(
            parse_mac("02:42:0a:58:00:05").unwrap(),
            [2, 0x42, 0x0a, 0x58, 0, 5]
        );
        assert!(parse_mac("02:42").is_err());
        assert!(parse_mac("02:42:0a:58:00:05:06").is_err());
        assert!(parse_mac("+2:42:0a:58:00:05").is_err());
        assert!(parse_mac("2:42:0a:58:00:05").is_err());
        assert!(parse_mac("zz:42:0a:58:00:05").is_err());
        assert_eq!(
            parse_cidr("10.88.0.0/16", false).unwrap(),
            ("10.88.0.0".parse().unwrap(), 16)
        );
        assert_eq!(parse_cidr("", true).unwrap(), ("::".parse().unwrap(), 0));
        assert!(parse_cidr("10.88.0.0", false).is_err());
        assert!(parse_cidr("10.88.0.0/x", false).is_err());
        assert!(parse_cidr("10.88.0.0/33", false).is_err());
        assert!(parse_cidr("10.88.0.0/+8", false).is_err());
        assert_eq!(parse_cidr("fd00::/128", true).unwrap().1, 128);
    }

    fn request() -> NetworkConfig {
        use kite_protocol::agent::{Interface, IpAddress, Route};
        let mut c = NetworkConfig::new();
        let mut i = Interface::new();
        i.name = "eth0".into();
        i.mac = "02:42:0a:58:00:05".into();
        i.current_mac = "02:00:00:00:00:01".into();
        i.mtu = 1500;
        let mut a = IpAddress::new();
        a.address = "10.88.0.5".into();
        a.prefix_len = 16;
        i.addresses.push(a);
        c.interfaces.push(i);
        let mut default = Route::new();
        default.device = "eth0".into();
        default.gateway = "10.88.0.1".into();
        let mut link = Route::new();
        link.device = "eth0".into();
        link.destination = "10.88.0.0/16".into();
        c.routes.push(default);
        c.routes.push(link);
        c
    }

    #[test]
    fn a_request_is_planned_whole_on_link_routes_first() {
        let p = plan(&request()).unwrap();
        assert_eq!(
            p.interfaces[0].addresses,
            vec![("10.88.0.5".parse().unwrap(), 16)]
        );
        assert_eq!(p.interfaces[0].current, [2, 0, 0, 0, 0, 1]);
        assert_eq!(p.routes[0].gateway, None);
        assert_eq!(p.routes[1].gateway, Some("10.88.0.1".parse().unwrap()));
    }

    #[test]
    fn a_bad_part_refuses_the_whole_request() {
        // Formerly the prefix length was cut to a byte: 272 became 16.
        let mut c = request();
        c.interfaces[0].addresses[0].prefix_len = 272;
        let e = plan(&c).unwrap_err().to_string();
        assert!(e.contains("10.88.0.5") && e.contains("272"), "{e}");

        let mut c = request();
        c.interfaces[0].name = "a-name-far-too-long".into();
        assert!(plan(&c).is_err());
        let mut c = request();
        c.interfaces[0].mtu = 70000;
        assert!(plan(&c).is_err());
        let mut c = request();
        c.routes[0].gateway = "fd00::1".into();
        c.routes[0].destination = "10.0.0.0/8".into();
        assert!(plan(&c).is_err());
        let mut c = request();
        c.routes[0].source = "garbage".into();
        assert!(plan(&c).is_err());
        let mut c = request();
        c.routes[0].device = "eth1".into();
        assert!(plan(&c).is_err());
        let mut c = request();
        let r = c.routes[0].clone();
        c.routes = vec![r; MAX_ROUTES + 1];
        assert!(plan(&c).is_err());
    }
}
