//! deploy/kubernetes parsed with the Kubernetes API's own types (k8s-openapi), and the fields
//! kite relies on checked against the installer they drive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kite_deploy::containerd_config::KITE_HANDLER;
use kite_deploy::node_label::{parse_label, DEFAULT_NODE_LABEL};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every document of every manifest the kustomization names, by kind.
fn documents() -> BTreeMap<String, Vec<serde_yaml_ng::Value>> {
    let k: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let resources: Vec<String> = k["resources"]
        .as_sequence()
        .expect("kustomization lists resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let mut on_disk: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut listed = resources.clone();
    listed.sort();
    assert_eq!(listed, on_disk, "the kustomization names every manifest");
    let mut out: BTreeMap<String, Vec<serde_yaml_ng::Value>> = BTreeMap::new();
    for r in resources {
        let text = std::fs::read_to_string(dir().join(&r)).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{r}: {e}"));
            let kind = v["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{r}: no kind"))
                .to_string();
            out.entry(kind).or_default().push(v);
        }
    }
    out
}

fn one<T: serde::de::DeserializeOwned>(
    docs: &BTreeMap<String, Vec<serde_yaml_ng::Value>>,
    kind: &str,
) -> T {
    let v = docs
        .get(kind)
        .and_then(|d| d.first())
        .unwrap_or_else(|| panic!("no {kind}"));
    serde_yaml_ng::from_value(v.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// The environment variables the installer reads (from its --help).
fn installer_env_vars() -> Vec<String> {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_kite-deploy"))
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8_lossy(&help.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next().map(str::to_string))
        .collect()
}

#[test]
fn every_manifest_parses_and_says_what_kite_relies_on() {
    let docs = documents();
    let ns: Namespace = one(&docs, "Namespace");
    let namespace = ns.metadata.name.unwrap();
    let sa: ServiceAccount = one(&docs, "ServiceAccount");
    assert_eq!(sa.metadata.namespace.as_deref(), Some(namespace.as_str()));

    // RBAC: the service account may label nodes, and nothing more.
    let role: ClusterRole = one(&docs, "ClusterRole");
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["nodes".to_string()][..])
    );
    let verbs = &rules[0].verbs;
    assert!(
        verbs.contains(&"patch".to_string()) && verbs.len() == 2,
        "{verbs:?}"
    );
    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(subject.name, sa.metadata.name.clone().unwrap());
    assert_eq!(subject.namespace.as_deref(), Some(namespace.as_str()));

    // The DaemonSet: privileged, the host's PID namespace, the host's / where the installer
    // looks for it, install on start and uninstall in preStop.
    let ds: DaemonSet = one(&docs, "DaemonSet");
    assert_eq!(ds.metadata.namespace.as_deref(), Some(namespace.as_str()));
    let spec = ds.spec.unwrap();
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    for (k, v) in spec.selector.match_labels.unwrap() {
        assert_eq!(
            template_labels.get(&k),
            Some(&v),
            "the selector matches the template"
        );
    }
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(
        pod.node_selector
            .unwrap()
            .get("kubernetes.io/os")
            .map(String::as_str),
        Some("linux")
    );
    let c = &pod.containers[0];
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let command = c.command.clone().unwrap();
    assert_eq!(command[0], "/usr/local/bin/kite-deploy");
    assert_eq!(&command[1..], ["install", "--wait"]);
    let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    assert_eq!(
        pre_stop.exec.as_ref().unwrap().command.as_deref(),
        Some(
            &[
                "/usr/local/bin/kite-deploy".to_string(),
                "uninstall".to_string()
            ][..]
        )
    );
    let probe = c.readiness_probe.as_ref().unwrap().exec.as_ref().unwrap();
    assert_eq!(probe.command.as_ref().unwrap()[1], "status");
    let env: BTreeMap<String, _> = c
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect();
    let node = env["NODE_NAME"]
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(node.field_path, "spec.nodeName");
    let known = installer_env_vars();
    assert!(known.contains(&"KITE_HOST_ROOT".to_string()), "{known:?}");
    for name in env.keys() {
        assert!(
            known.contains(name),
            "the installer does not read {name} (it reads {known:?})"
        );
    }
    let host_root = env["KITE_HOST_ROOT"].value.clone().unwrap();
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == host_root)
        .expect("the host's / is mounted where KITE_HOST_ROOT says");
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(volume.host_path.unwrap().path, "/");
    assert!(pod.termination_grace_period_seconds.unwrap() >= 120);

    // The RuntimeClass: the handler containerd knows, scheduled on the installer's label.
    let rc: RuntimeClass = one(&docs, "RuntimeClass");
    assert_eq!(rc.handler, KITE_HANDLER);
    let (key, value) = parse_label(DEFAULT_NODE_LABEL).unwrap();
    assert_eq!(
        rc.scheduling
            .unwrap()
            .node_selector
            .unwrap()
            .get(key)
            .map(String::as_str),
        Some(value)
    );
    let fixed = rc.overhead.unwrap().pod_fixed.unwrap();
    assert!(
        fixed.contains_key("memory") && fixed.contains_key("cpu"),
        "{fixed:?}"
    );
}
