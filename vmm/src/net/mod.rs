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
//! Each mechanism has its module: [`tap`], [`tc`], [`macvtap`], [`netns`] (entering the
//! namespace, reading it).
//!
//! A pooled VM boots before its pod's namespace exists, with one tap made in the pool's holding
//! namespace ([`open_pool_tap`]) and a MAC of its own. Its adopter moves that tap into the pod's
//! namespace under the name a cold boot gives it, adds the same redirect, and has the guest
//! take the pod's MAC ([`attach_pooled`]): from then on the pod network is the same as a
//! cold-booted one's, and [`release`] undoes it the same way.
//!
//! The guest agent then names its NICs (found by MAC) as the namespace does and gives them the
//! same MTU, addresses, routes (with their MTU) and neighbours.
//!
//! Taps are not persistent: each lives as long as the descriptor QEMU holds, so a VM that
//! dies takes its taps and their qdiscs along. What outlives QEMU — the ingress qdisc on the
//! namespace's interface, a macvtap, a device bound to vfio-pci — is recorded in
//! `network.json` in the sandbox dir and released by [`release`], on shutdown and by
//! `shim delete` after a crash.

mod macvtap;
mod netns;
mod tap;
mod tc;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use kite_protocol::agent as proto;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::NetworkMode;
use crate::passthrough::{self, PciFunction};
use netns::{in_netns, index_of, Link};

/// Every interface kite makes in a pod's namespace is named so, and never attached itself.
const OWN_PREFIX: &str = "kite-";
const TAP_PREFIX: &str = "kite-tap";
const MACVTAP_PREFIX: &str = "kite-mvt";
/// The file in the sandbox dir that records what [`release`] must undo.
pub const STATE_FILE: &str = "network.json";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("sandbox {sandbox}: network namespace {netns}: {op}")]
    Netns {
        sandbox: String,
        netns: PathBuf,
        op: &'static str,
        #[source]
        source: Box<NetnsError>,
    },
    #[error("sandbox {sandbox}: record the pod network in {path}")]
    Record {
        sandbox: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Passthrough(#[from] passthrough::PassthroughError),
}

/// What failed inside a pod's network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {interface} vanished")]
    Vanished { interface: String },
    #[error("unexpected {what}")]
    Unexpected { what: String },
    #[error("interface {interface}")]
    Interface {
        interface: String,
        #[source]
        source: Box<NetnsError>,
    },
    #[error("the namespace's thread panicked")]
    Panicked,
}

impl NetnsError {
    fn on(interface: &str) -> impl FnOnce(NetnsError) -> NetnsError {
        let interface = interface.to_string();
        move |source| NetnsError::Interface {
            interface,
            source: Box::new(source),
        }
    }
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
    /// `aa:bb:cc:dd:ee:ff`: the guest's NIC has it once the guest is configured.
    pub mac: String,
    /// The MAC QEMU gives the virtual NIC, when it is not `mac`. A tap NIC boots with a random
    /// one and the guest gives it the pod's at run time, as in a pooled VM, whose NIC exists
    /// before its pod: so a pod cannot tell a cold VM from an adopted one by its NIC (the
    /// kernel's `addr_assign_type`, the permanent address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_mac: Option<String>,
    pub attachment: Attachment,
}

impl AttachedNic {
    /// The MAC the virtual NIC boots with.
    pub fn boot_mac(&self) -> &str {
        self.device_mac.as_deref().unwrap_or(&self.mac)
    }
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
    let PodInterfaces {
        links, mut guest, ..
    } = read_pod(sandbox, netns)?;

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
            // A passed-through function keeps its own MAC; a macvtap in passthru mode takes the
            // interface's.
            device_mac: (function.is_none() && mode != NetworkMode::Macvtap)
                .then(crate::pool::random_mac),
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
    record(sandbox, sandbox_dir, netns, &nics)?;
    for nic in &nics {
        if let (Some(device_mac), Some(iface)) = (
            &nic.device_mac,
            guest.interfaces.iter_mut().find(|i| i.name == nic.name),
        ) {
            iface.current_mac = device_mac.clone();
        }
    }

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

/// Writes `network.json`: what [`release`] will undo. Written before anything is changed, so a
/// crash at any point leaves the record.
fn record(
    sandbox: &str,
    sandbox_dir: &Path,
    netns: &Path,
    nics: &[AttachedNic],
) -> Result<(), NetworkError> {
    let state = NetworkState {
        netns: netns.to_path_buf(),
        nics: nics.to_vec(),
    };
    let path = sandbox_dir.join(STATE_FILE);
    std::fs::write(
        &path,
        serde_json::to_vec(&state).expect("network state serializes"),
    )
    .map_err(|source| NetworkError::Record {
        sandbox: sandbox.to_string(),
        path,
        source,
    })
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
                    let fd = tap::open_tap(&tap)
                        .map_err(netns::io(format!("open tap {tap}")))
                        .map_err(NetnsError::on(&link.name))?;
                    tc::redirect(&h, &link, &tap)
                        .await
                        .map_err(NetnsError::on(&link.name))?;
                    fd
                }
                Attachment::Macvtap { link: name } => macvtap::open(&h, &link, &name, &node_dir)
                    .await
                    .map_err(NetnsError::on(&link.name))?,
                Attachment::Vfio { .. } => unreachable!("VFIO functions are bound above"),
            };
            fds.push(fd);
        }
        Ok(fds)
    })
    .map_err(|source| NetworkError::Netns {
        sandbox: sandbox_owned,
        netns: netns.to_path_buf(),
        op: "attach",
        source: Box::new(source),
    })
}

/// A pod's namespace as read before anything is attached: whether a pooled VM can take it.
pub struct PodInterfaces {
    netns: PathBuf,
    links: Vec<Link>,
    guest: proto::NetworkConfig,
}

impl PodInterfaces {
    /// The guest's network configuration for a pooled VM whose NIC has MAC `pool_mac`: the
    /// pod's, the NIC found by its current MAC (it takes the pod's). Known before the tap is
    /// attached, so the guest can be configured while the host side is.
    pub fn pooled_guest_config(&self, pool_mac: &str) -> proto::NetworkConfig {
        let mut guest = self.guest.clone();
        if let Some(iface) = guest.interfaces.first_mut() {
            iface.current_mac = pool_mac.to_string();
        }
        guest
    }

    /// Why a pooled VM (one tap NIC) cannot take this pod's network, if it cannot: a pod with
    /// no interface or more than one, a PCI function to pass through, or macvtaps (made on the
    /// pod's interface, so not before it exists).
    pub fn unfit_for_pool(
        &self,
        mode: NetworkMode,
        vfio_passthrough: bool,
    ) -> Option<&'static str> {
        match self.links.as_slice() {
            [] => Some("no-interface"),
            [link] if link.pci.is_some() && vfio_passthrough => Some("vfio"),
            [_] if mode == NetworkMode::Macvtap => Some("macvtap"),
            [_] => None,
            _ => Some("interfaces"),
        }
    }
}

/// Reads the pod's namespace `netns` (interfaces, addresses, routes, neighbours).
pub fn read_pod(sandbox: &str, netns: &Path) -> Result<PodInterfaces, NetworkError> {
    let (links, guest) = in_netns(netns, "read", |h| async move { netns::read(&h).await })
        .map_err(|source| NetworkError::Netns {
            sandbox: sandbox.to_string(),
            netns: netns.to_path_buf(),
            op: "read",
            source: Box::new(source),
        })?;
    Ok(PodInterfaces {
        netns: netns.to_path_buf(),
        links,
        guest,
    })
}

/// Makes (or finds) the pool's holding network namespace, bound at `path`: pooled VMs' taps
/// live there until their pods take them.
pub fn ensure_holding_netns(path: &Path) -> Result<(), NetnsError> {
    netns::ensure_bound(path)
}

/// Removes the holding namespace at `path` (the taps in it went with their VMs).
pub fn remove_holding_netns(path: &Path) {
    netns::remove_bound(path);
}

/// Opens a tap named `name` in the holding namespace `holding`, for a pooled VM.
pub fn open_pool_tap(holding: &Path, name: &str) -> Result<OwnedFd, NetnsError> {
    let tap_name = name.to_string();
    in_netns(holding, "pool tap", move |_| async move {
        tap::open_tap(&tap_name).map_err(netns::io(format!("open tap {tap_name}")))
    })
}

/// Gives the pod network `pod` to the adopted VM in `sandbox_dir`, whose NIC is the tap
/// `pool_tap` in the holding namespace `holding` with MAC `pool_mac`: records it (as a cold
/// boot would), moves the tap into the pod's namespace under a cold boot's name, redirects as
/// a cold boot does, and returns the guest's configuration (which gives the NIC the pod's MAC).
/// On failure what was done is undone.
pub fn attach_pooled(
    sandbox: &str,
    pod: PodInterfaces,
    sandbox_dir: &Path,
    holding: &Path,
    pool_tap: &str,
    pool_mac: &str,
) -> Result<PodNetwork, NetworkError> {
    let guest = pod.pooled_guest_config(pool_mac);
    let PodInterfaces { netns, links, .. } = pod;
    let [link] = links.as_slice() else {
        return Err(NetworkError::Netns {
            sandbox: sandbox.to_string(),
            netns,
            op: "attach a pooled VM",
            source: Box::new(NetnsError::Unexpected {
                what: format!("{} interfaces (a pooled VM takes one)", links.len()),
            }),
        });
    };
    let link = link.clone();
    let tap = format!("{TAP_PREFIX}0");
    let nics = vec![AttachedNic {
        name: link.name.clone(),
        mac: format_mac(&link.mac),
        device_mac: Some(pool_mac.to_string()),
        attachment: Attachment::Tap { tap: tap.clone() },
    }];
    record(sandbox, sandbox_dir, &netns, &nics)?;
    let netns_err = |op: &'static str, netns: &Path| {
        let (sandbox, netns) = (sandbox.to_string(), netns.to_path_buf());
        move |source| NetworkError::Netns {
            sandbox,
            netns,
            op,
            source: Box::new(source),
        }
    };
    let moved = std::fs::File::open(&netns)
        .map_err(netns::io("open the pod's namespace"))
        .and_then(|target| {
            let (from, to) = (pool_tap.to_string(), tap.clone());
            in_netns(holding, "move tap", move |h| async move {
                let index = index_of(&h, &from)
                    .await
                    .ok_or_else(|| NetnsError::Vanished {
                        interface: from.clone(),
                    })?;
                // One message: into the pod's namespace, under the cold boot's name.
                h.link()
                    .set(
                        rtnetlink::LinkUnspec::new_with_index(index)
                            .setns_by_fd(target.as_raw_fd())
                            .name(to.clone())
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(netns::netlink(format!("move {from} into the pod as {to}")))
            })
        })
        .map_err(netns_err("move the pooled VM's tap", holding))
        .and_then(|()| {
            let tap = tap.clone();
            in_netns(&netns, "attach", move |h| async move {
                tc::redirect(&h, &link, &tap)
                    .await
                    .map_err(NetnsError::on(&link.name))
            })
            .map_err(netns_err("attach", &netns))
        });
    if let Err(e) = moved {
        release(sandbox_dir, Path::new(crate::passthrough::SYSFS));
        return Err(e);
    }
    info!(sandbox, netns = %netns.display(), "pod network attached to a pooled VM");
    Ok(PodNetwork {
        netns,
        nics,
        tap_fds: Vec::new(),
        guest,
    })
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
        warn!(path = %path.display(), "unreadable, nothing released");
        return;
    };
    for nic in &state.nics {
        if let Attachment::Vfio { function } = &nic.attachment {
            if let Err(e) = passthrough::rebind_host(sysfs, function) {
                warn!(interface = %nic.name, error = %kite_protocol::errors::error_chain(&e), "give the device back");
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
                tc::remove_ingress(&h, &name).await?;
            }
            Ok(())
        });
        if let Err(e) = r {
            warn!(netns = %state.netns.display(), error = %kite_protocol::errors::error_chain(&e), "release the pod network");
        }
    }
    let _ = std::fs::remove_file(&path);
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
                    nic.boot_mac()
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

    #[test]
    fn nic_arguments_follow_the_attachments() {
        let nics = vec![
            AttachedNic {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                device_mac: Some("02:aa:bb:cc:dd:ee".into()),
                attachment: Attachment::Tap {
                    tap: "kite-tap0".into(),
                },
            },
            AttachedNic {
                name: "eth1".into(),
                mac: "02:00:00:00:00:02".into(),
                device_mac: None,
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
            "-netdev tap,id=net0,fd=7 -device virtio-net-device,netdev=net0,mac=02:aa:bb:cc:dd:ee \
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
