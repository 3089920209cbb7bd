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

fn parse_ip(what: &'static str, s: &str) -> Result<IpAddr, NetworkError> {
    s.parse()
        .map_err(|e: std::net::AddrParseError| NetworkError::Invalid {
            what,
            value: s.into(),
            reason: e.to_string(),
        })
}

fn parse_mac(s: &str) -> Result<Vec<u8>, NetworkError> {
    let bytes: Result<Vec<u8>, _> = s.split(':').map(|b| u8::from_str_radix(b, 16)).collect();
    match bytes {
        Ok(b) if b.len() == 6 => Ok(b),
        _ => Err(NetworkError::Invalid {
            what: "MAC",
            value: s.into(),
            reason: "not six hex bytes".into(),
        }),
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
    let (ip, len) = s.split_once('/').ok_or_else(|| NetworkError::Invalid {
        what: "route destination",
        value: s.into(),
        reason: "no prefix length".into(),
    })?;
    let len: u8 = len.parse().map_err(|_| NetworkError::Invalid {
        what: "route destination",
        value: s.into(),
        reason: "bad prefix length".into(),
    })?;
    Ok((parse_ip("route destination", ip)?, len))
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
    let h = connect()?;
    for iface in &config.interfaces {
        let ierr = |reason: String| NetworkError::Interface {
            name: iface.name.clone(),
            mac: iface.mac.clone(),
            reason,
        };
        let mac = parse_mac(&iface.mac)?;
        // A VM booted before its pod has a NIC with a MAC of its own: found by that one, it
        // takes the pod's below (virtio-net tells QEMU, whose receive filter follows).
        let current_text = if iface.current_mac.is_empty() {
            &iface.mac
        } else {
            &iface.current_mac
        };
        let current = parse_mac(current_text)?;
        // Found by the pod's MAC too: a configuration retried after the NIC took it.
        let index = find_by_mac(&h, &[&current, &mac]).await?.ok_or_else(|| {
            ierr(format!(
                "no NIC with MAC {current_text} within {NIC_WAIT:?}"
            ))
        })?;
        // A link is renamed only while it is down.
        h.link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(|e| ierr(format!("down: {e}")))?;
        let mut set = LinkUnspec::new_with_index(index).name(iface.name.clone());
        if current != mac {
            set = set.address(mac.clone());
        }
        if iface.mtu > 0 {
            set = set.mtu(iface.mtu);
        }
        h.link()
            .set(set.up().build())
            .execute()
            .await
            .map_err(|e| ierr(format!("rename, MTU {}, up: {e}", iface.mtu)))?;
        for a in &iface.addresses {
            let ip = parse_ip("address", &a.address)?;
            ignore_exists(
                h.address()
                    .add(index, ip, a.prefix_len as u8)
                    .execute()
                    .await,
            )
            .map_err(|e| ierr(format!("address {}/{}: {e}", a.address, a.prefix_len)))?;
        }
    }
    // On-link routes first: a gateway must be reachable before a route through it is added.
    let mut routes: Vec<_> = config.routes.iter().collect();
    routes.sort_by_key(|r| !r.gateway.is_empty());
    for r in routes {
        let rerr = |e: String| NetworkError::Interface {
            name: r.device.clone(),
            mac: String::new(),
            reason: format!("route {:?} via {:?}: {e}", r.destination, r.gateway),
        };
        let index = link_index(&h, &r.device).await?;
        let v6 = r.destination.contains(':') || r.gateway.contains(':');
        let (dest, len) = parse_cidr(&r.destination, v6)?;
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dest, len)
            .map_err(|e| rerr(e.to_string()))?
            .output_interface(index);
        if !r.gateway.is_empty() {
            // A gateway of the other family is refused here, with the reason.
            b = b
                .gateway(parse_ip("gateway", &r.gateway)?)
                .map_err(|e| rerr(e.to_string()))?;
        }
        if let Ok(source) = parse_ip("source", &r.source) {
            b = b.pref_source(source).map_err(|e| rerr(e.to_string()))?;
        }
        let mut msg = b.build();
        if r.gateway.is_empty() {
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
    for n in &config.neighbours {
        let index = link_index(&h, &n.device).await?;
        let ip = parse_ip("neighbour", &n.address)?;
        let mac = parse_mac(&n.mac)?;
        h.neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
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
            vec![2, 0x42, 0x0a, 0x58, 0, 5]
        );
        assert!(parse_mac("02:42").is_err());
        assert!(parse_mac("zz:42:0a:58:00:05").is_err());
        assert_eq!(
            parse_cidr("10.88.0.0/16", false).unwrap(),
            ("10.88.0.0".parse().unwrap(), 16)
        );
        assert_eq!(parse_cidr("", true).unwrap(), ("::".parse().unwrap(), 0));
        assert!(parse_cidr("10.88.0.0", false).is_err());
        assert!(parse_cidr("10.88.0.0/x", false).is_err());
    }
}
