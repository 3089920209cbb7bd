//! tc: the ingress redirects that join an interface of the pod's namespace and its tap, and
//! their removal.

use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec};

use super::netns::{index_of, netlink, Link};
use super::NetnsError;

/// rtnetlink's tc calls take the interface index as i32 (the kernel's `int ifindex`).
fn if_index(index: u32) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
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
pub(super) async fn redirect(h: &Handle, link: &Link, tap: &str) -> Result<(), NetnsError> {
    let tap_index = index_of(h, tap).await.ok_or_else(|| NetnsError::Vanished {
        interface: tap.to_string(),
    })?;
    h.link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(link.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("set {tap} up")))?;
    for (from, to) in [(link.index, tap_index), (tap_index, link.index)] {
        ignore_exists(h.qdisc().add(if_index(from)).ingress().execute().await)
            .map_err(netlink(format!("ingress qdisc on interface {from}")))?;
        h.traffic_filter(if_index(from))
            .add()
            .parent(0xffff_0000)
            .protocol(PROTOCOL_ALL)
            .redirect(to)
            .map_err(netlink(format!("redirect filter {from} -> {to}")))?
            .execute()
            .await
            .map_err(netlink(format!("redirect filter {from} -> {to}")))?;
    }
    Ok(())
}

/// Removes the ingress qdisc (and with it kite's redirect filters) from the interface `name`;
/// an interface or qdisc that is already gone is not an error.
pub(super) async fn remove_ingress(h: &Handle, name: &str) -> Result<(), NetnsError> {
    let Some(index) = index_of(h, name).await else {
        return Ok(());
    };
    let mut del = h.qdisc().del(if_index(index));
    del.message_mut().header.parent = TcHandle::INGRESS;
    del.message_mut().header.handle = TcHandle::from(0xffff_0000);
    match del.execute().await {
        Err(rtnetlink::Error::NetlinkError(m))
            if m.raw_code() == -libc::ENOENT || m.raw_code() == -libc::EINVAL =>
        {
            Ok(())
        }
        other => other.map_err(netlink(format!("{name}: remove the ingress qdisc"))),
    }
}
