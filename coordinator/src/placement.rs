//! Placement: which node runs a replica. Like a kube-scheduler's, in two passes:
//!
//! - **filter**: the node is ready and not cordoned, runs the pod's runtime class, and has room
//!   for its cpu and memory requests;
//! - **score** (each 0–100, weighted; spread 3, locality 2, room 1, archive 1 by default):
//!   **image locality** (bytes of the image's layers the node
//!   holds or is already fetching, of the image's total), **spread** (fewer replicas of the same
//!   app on the node), **least allocated** (room left after the pod), and the Java cache's
//!   **archive locality** (the node holds the app's class archive).
//!
//! [`place_all`] places an app's new replicas together: each decision counts the ones before
//! it (their requests, their replicas, and the fetch their bind starts), so replicas spread and
//! a node that is about to fetch an image counts as having it. Ties go to the node whose name
//! sorts first: decisions are reproducible.

use std::collections::{BTreeMap, HashSet};

/// cpu in millicores, memory in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// What the coordinator knows of a node for placing (from its agent's status).
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub name: String,
    pub ready: bool,
    pub cordoned: bool,
    pub allocatable: Resources,
    /// Requests of the pods assigned to it.
    pub requested: Resources,
    pub runtime_classes: HashSet<String>,
    /// Layer digests it holds, and those it is fetching.
    pub layers: HashSet<String>,
    pub fetching: HashSet<String>,
    /// Replicas by app.
    pub replicas: BTreeMap<String, u32>,
    /// Keys of the Java class archives it holds.
    pub java_archives: HashSet<String>,
}

/// A replica to place.
#[derive(Clone, Debug, Default)]
pub struct PodRequest {
    /// `namespace/name` of its app.
    pub app: String,
    pub requests: Resources,
    pub runtime_class: String,
    /// The image's layers: (digest, compressed bytes).
    pub layers: Vec<(String, u64)>,
    /// The app's Java cache key, when it asks for the cache.
    pub java_key: Option<String>,
}

/// The weights of the scores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    pub image_locality: f64,
    pub spread: f64,
    pub least_allocated: f64,
    pub java_archive: f64,
}

impl Default for Weights {
    fn default() -> Self {
        // An app's replicas on distinct nodes first (its availability), then locality among
        // those (a pull is the largest stage of a start on a cold node), then balance.
        Weights {
            image_locality: 2.0,
            spread: 3.0,
            least_allocated: 1.0,
            java_archive: 1.0,
        }
    }
}

/// A decision and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Index into the nodes.
    pub node: usize,
    pub score: f64,
    pub image_locality: f64,
    pub spread: f64,
    pub least_allocated: f64,
    pub java_archive: f64,
}

/// No node fits: how many nodes each filter turned away (a kube-scheduler's message).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("0/{total} nodes are available: {}", reasons.iter().map(|(r, n)| format!("{n} {r}")).collect::<Vec<_>>().join(", "))]
pub struct Unschedulable {
    pub total: usize,
    pub reasons: BTreeMap<&'static str, usize>,
}

fn filter(node: &NodeView, pod: &PodRequest) -> Result<(), &'static str> {
    if !node.ready {
        return Err("not ready");
    }
    if node.cordoned {
        return Err("cordoned");
    }
    if !node.runtime_classes.contains(&pod.runtime_class) {
        return Err("without the runtime class");
    }
    let free = |alloc: u64, used: u64| alloc.saturating_sub(used);
    if free(node.allocatable.cpu_millis, node.requested.cpu_millis) < pod.requests.cpu_millis {
        return Err("with insufficient cpu");
    }
    if free(node.allocatable.memory_bytes, node.requested.memory_bytes) < pod.requests.memory_bytes
    {
        return Err("with insufficient memory");
    }
    Ok(())
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        1.0
    } else {
        part as f64 / whole as f64
    }
}

/// Scores a node that passed the filter.
fn score(node: &NodeView, pod: &PodRequest, max_replicas: u32, w: &Weights) -> Decision {
    let total: u64 = pod.layers.iter().map(|(_, b)| b).sum();
    let local: u64 = pod
        .layers
        .iter()
        .filter(|(d, _)| node.layers.contains(d) || node.fetching.contains(d))
        .map(|(_, b)| b)
        .sum();
    let image_locality = 100.0 * ratio(local, total);
    let mine = node.replicas.get(&pod.app).copied().unwrap_or(0);
    let spread = if max_replicas == 0 {
        100.0
    } else {
        100.0 * f64::from(max_replicas - mine.min(max_replicas)) / f64::from(max_replicas)
    };
    let left = |alloc: u64, used: u64, want: u64| {
        ratio(alloc.saturating_sub(used).saturating_sub(want), alloc)
    };
    let least_allocated = 50.0
        * (left(
            node.allocatable.cpu_millis,
            node.requested.cpu_millis,
            pod.requests.cpu_millis,
        ) + left(
            node.allocatable.memory_bytes,
            node.requested.memory_bytes,
            pod.requests.memory_bytes,
        ));
    let java_archive = match &pod.java_key {
        Some(k) if node.java_archives.contains(k) => 100.0,
        _ => 0.0,
    };
    Decision {
        node: 0,
        score: w.image_locality * image_locality
            + w.spread * spread
            + w.least_allocated * least_allocated
            + w.java_archive * java_archive,
        image_locality,
        spread,
        least_allocated,
        java_archive,
    }
}

/// The best node for `pod`, or why none fits.
pub fn place(nodes: &[NodeView], pod: &PodRequest, w: &Weights) -> Result<Decision, Unschedulable> {
    let max_replicas = nodes
        .iter()
        .map(|n| n.replicas.get(&pod.app).copied().unwrap_or(0))
        .max()
        .unwrap_or(0);
    let mut best: Option<Decision> = None;
    let mut reasons: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        if let Err(r) = filter(node, pod) {
            *reasons.entry(r).or_default() += 1;
            continue;
        }
        let mut d = score(node, pod, max_replicas, w);
        d.node = i;
        let better = match &best {
            None => true,
            Some(b) => d.score > b.score || (d.score == b.score && node.name < nodes[b.node].name),
        };
        if better {
            best = Some(d);
        }
    }
    best.ok_or(Unschedulable {
        total: nodes.len(),
        reasons,
    })
}

/// Places `pods` one after the other, each decision counting the previous ones (requests,
/// replicas, and the fetch of the image's layers its bind starts on the node).
pub fn place_all(
    nodes: &mut [NodeView],
    pods: &[PodRequest],
    w: &Weights,
) -> Vec<Result<Decision, Unschedulable>> {
    pods.iter()
        .map(|pod| {
            let d = place(nodes, pod, w)?;
            let n = &mut nodes[d.node];
            n.requested.cpu_millis += pod.requests.cpu_millis;
            n.requested.memory_bytes += pod.requests.memory_bytes;
            *n.replicas.entry(pod.app.clone()).or_default() += 1;
            for (digest, _) in &pod.layers {
                if !n.layers.contains(digest) {
                    n.fetching.insert(digest.clone());
                }
            }
            Ok(d)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str) -> NodeView {
        NodeView {
            name: name.into(),
            ready: true,
            allocatable: Resources {
                cpu_millis: 4000,
                memory_bytes: 8 * GI,
            },
            runtime_classes: ["kite".to_string(), "runc".to_string()].into(),
            ..Default::default()
        }
    }

    fn pod(app: &str) -> PodRequest {
        PodRequest {
            app: app.into(),
            requests: Resources {
                cpu_millis: 500,
                memory_bytes: GI,
            },
            runtime_class: "kite".into(),
            layers: vec![
                ("sha256:base".into(), 30 << 20),
                ("sha256:app".into(), 300 << 20),
            ],
            java_key: None,
        }
    }

    #[test]
    fn filters_say_why_no_node_fits() {
        let mut nodes = vec![node("a"), node("b"), node("c"), node("d")];
        nodes[0].ready = false;
        nodes[1].cordoned = true;
        nodes[2].runtime_classes.remove("kite");
        nodes[3].requested.memory_bytes = 7 * GI + 1;
        let err = place(&nodes, &pod("shop/web"), &Weights::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0/4 nodes are available: 1 cordoned, 1 not ready, 1 with insufficient memory, 1 without the runtime class"
        );
    }

    #[test]
    fn the_node_with_the_image_wins_then_replicas_spread() {
        let mut nodes = vec![node("a"), node("b"), node("c")];
        nodes[2].layers.insert("sha256:app".into());
        let d = place(&nodes, &pod("shop/web"), &Weights::default()).unwrap();
        assert_eq!(nodes[d.node].name, "c");
        assert!(d.image_locality > 90.0);
        // Three replicas together: the first goes where the image is; the other nodes start
        // fetching at their bind, so the next two spread over them.
        let pods = vec![pod("shop/web"); 3];
        let placed: Vec<String> = place_all(&mut nodes, &pods, &Weights::default())
            .into_iter()
            .map(|d| nodes[d.unwrap().node].name.clone())
            .collect();
        let mut sorted = placed.clone();
        sorted.sort();
        assert_eq!(sorted, ["a", "b", "c"], "{placed:?}");
        assert_eq!(placed[0], "c");
        assert!(nodes.iter().all(|n| n.replicas["shop/web"] == 1));
    }

    #[test]
    fn room_and_archives_break_ties_and_equal_nodes_go_by_name() {
        let mut nodes = vec![node("b"), node("a")];
        let d = place(&nodes, &pod("x/y"), &Weights::default()).unwrap();
        assert_eq!(nodes[d.node].name, "a", "a tie goes by name");
        nodes[1].requested.cpu_millis = 3000;
        let d = place(&nodes, &pod("x/y"), &Weights::default()).unwrap();
        assert_eq!(nodes[d.node].name, "b", "least allocated");
        let mut java = pod("x/y");
        java.java_key = Some("k1".into());
        nodes[1].java_archives.insert("k1".into());
        let d = place(&nodes, &java, &Weights::default()).unwrap();
        assert_eq!(
            nodes[d.node].name, "a",
            "the archive is worth more than the room"
        );
        assert_eq!(d.java_archive, 100.0);
    }
}
