//! Pods as Kubernetes `v1/Pod` manifests (YAML or JSON), parsed with k8s-openapi's types and
//! checked against what kite runs: a field Kubernetes does not know, or one kite does not
//! support, is an error naming it — never ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::StartOrder;
use crate::quantity;

/// Pod annotation that picks the start order (`parallel` or `kubelet`).
pub const START_ORDER_ANNOTATION: &str = "kite.io/start-order";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the manifest is not YAML or JSON: {0}")]
    Syntax(String),
    #[error("the manifest is a {api_version}/{kind}, not a v1/Pod")]
    NotAPod { api_version: String, kind: String },
    #[error("{path}: unknown field (Kubernetes' v1/Pod has no such field)")]
    UnknownField { path: String },
    #[error("{path}: not supported by kite")]
    Unsupported { path: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

fn invalid(path: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        path: path.into(),
        reason: reason.into(),
    }
}

/// The fields kite runs, as paths: `[]` stands for any array index, `*` for any map key.
const SUPPORTED: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "metadata.labels.*",
    "metadata.annotations.*",
    "spec.runtimeClassName",
    "spec.restartPolicy",
    "spec.terminationGracePeriodSeconds",
    "spec.volumes[].name",
    "spec.volumes[].emptyDir",
    "spec.containers[].name",
    "spec.containers[].image",
    "spec.containers[].imagePullPolicy",
    "spec.containers[].command[]",
    "spec.containers[].args[]",
    "spec.containers[].workingDir",
    "spec.containers[].env[].name",
    "spec.containers[].env[].value",
    "spec.containers[].ports[].name",
    "spec.containers[].ports[].containerPort",
    "spec.containers[].ports[].protocol",
    "spec.containers[].resources.requests.cpu",
    "spec.containers[].resources.requests.memory",
    "spec.containers[].resources.limits.cpu",
    "spec.containers[].resources.limits.memory",
    "spec.containers[].volumeMounts[].name",
    "spec.containers[].volumeMounts[].mountPath",
    "spec.containers[].volumeMounts[].readOnly",
];

/// A probe's fields, under `readinessProbe` and `livenessProbe`.
const PROBE_FIELDS: &[&str] = &[
    "httpGet.path",
    "httpGet.port",
    "httpGet.scheme",
    "tcpSocket.port",
    "exec.command[]",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
];

fn supported_paths() -> BTreeSet<String> {
    let mut all: BTreeSet<String> = SUPPORTED.iter().map(|s| s.to_string()).collect();
    for probe in ["readinessProbe", "livenessProbe"] {
        for field in PROBE_FIELDS {
            all.insert(format!("spec.containers[].{probe}.{field}"));
        }
    }
    all
}

/// Walks the manifest as written; the first field outside [`SUPPORTED`] is the error
/// (`unknown` holds what Kubernetes itself does not know, to say which it is).
fn check_fields(
    value: &serde_json::Value,
    path: &str,
    pattern: &str,
    supported: &BTreeSet<String>,
    unknown: &BTreeSet<String>,
) -> Result<(), ManifestError> {
    let allowed = |p: &str| {
        supported.contains(p)
            || supported.range(p.to_string()..).next().is_some_and(|s| {
                s.starts_with(p) && (s[p.len()..].starts_with('.') || s[p.len()..].starts_with('['))
            })
    };
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let any_key = format!("{pattern}.*");
                if supported.contains(&any_key) {
                    continue;
                }
                let child_pattern = if pattern.is_empty() {
                    key.clone()
                } else {
                    format!("{pattern}.{key}")
                };
                if !allowed(&child_pattern) {
                    return Err(if unknown.contains(&child_path) {
                        ManifestError::UnknownField { path: child_path }
                    } else {
                        ManifestError::Unsupported { path: child_path }
                    });
                }
                check_fields(child, &child_path, &child_pattern, supported, unknown)?;
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                check_fields(
                    child,
                    &format!("{path}[{i}]"),
                    &format!("{pattern}[]"),
                    supported,
                    unknown,
                )?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// serde_ignored's path in the manifest's notation (`spec.containers[0].imagee`).
fn ignored_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => {
            let p = ignored_path(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// How a pod's containers are restarted when they end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether a container that ended with `exit_code` is started again.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

/// cpu (millicores) and memory (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ProbeAction {
    Http { port: u16, path: String },
    Tcp { port: u16 },
    Exec { command: Vec<String> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProbePlan {
    pub action: ProbeAction,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ContainerPlan {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    pub env: Vec<(String, String)>,
    pub requests: Resources,
    pub limits: Resources,
    pub readiness: Option<ProbePlan>,
    pub liveness: Option<ProbePlan>,
    /// (volume, mount path, read-only)
    pub mounts: Vec<(String, String, bool)>,
}

/// A pod as the agent runs it: the manifest, checked, in the terms of the CRI.
#[derive(Clone, Debug)]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_class: String,
    pub restart_policy: RestartPolicy,
    pub grace_period: Duration,
    /// The pod's own choice (annotation), if it makes one.
    pub start_order: Option<StartOrder>,
    /// The Java start-up cache (annotation `kite.io/java-cache: "on"`).
    pub java_cache: bool,
    pub containers: Vec<ContainerPlan>,
    /// emptyDir volumes, by name.
    pub volumes: Vec<String>,
    /// The manifest as admitted (uid and namespace filled in).
    pub manifest: Pod,
}

impl PodPlan {
    /// Requests of the whole pod (a container without requests counts its limits, as
    /// Kubernetes defaults them).
    pub fn requests(&self) -> Resources {
        let mut total = Resources::default();
        for c in &self.containers {
            let cpu = c.requests.cpu_millis.or(c.limits.cpu_millis);
            let mem = c.requests.memory_bytes.or(c.limits.memory_bytes);
            if let Some(cpu) = cpu {
                total.cpu_millis = Some(total.cpu_millis.unwrap_or(0) + cpu);
            }
            if let Some(mem) = mem {
                total.memory_bytes = Some(total.memory_bytes.unwrap_or(0) + mem);
            }
        }
        total
    }

    pub fn container(&self, name: &str) -> Option<&ContainerPlan> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// The manifest as JSON.
    pub fn manifest_json(&self) -> String {
        serde_json::to_string(&self.manifest).unwrap_or_default()
    }
}

/// Parses and checks a manifest; `default_runtime_class` is used when it names none. A pod
/// without a uid gets a new one.
pub fn parse(text: &str, default_runtime_class: &str) -> Result<PodPlan, ManifestError> {
    let value: serde_json::Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| ManifestError::Syntax(e.to_string()))?
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| ManifestError::Syntax(e.to_string()))?
    };
    if !value.is_object() {
        return Err(ManifestError::Syntax("not a mapping".into()));
    }
    let field = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != "v1" || kind != "Pod" {
        return Err(ManifestError::NotAPod { api_version, kind });
    }
    let mut unknown = BTreeSet::new();
    let typed: Result<Pod, _> = serde_ignored::deserialize(value.clone(), |path| {
        unknown.insert(ignored_path(&path));
    });
    check_fields(&value, "", "", &supported_paths(), &unknown)?;
    if let Err(e) = typed {
        // Say where: serde_path_to_error finds the field the type error is in.
        let path = serde_path_to_error::deserialize::<_, Pod>(value)
            .err()
            .map(|e| e.path().to_string())
            .unwrap_or_default();
        return Err(invalid(path, e.to_string()));
    }
    let pod = typed.expect("checked above");
    plan(pod, default_runtime_class)
}

/// Whether `s` is a DNS label (lowercase letters, digits and '-', not at the ends) of at most
/// `max` characters: what Kubernetes requires of names.
pub fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_label(path: &str, s: &str) -> Result<(), ManifestError> {
    if is_dns_label(s, 63) {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!("{s:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"),
        ))
    }
}

/// Builds the plan from a typed pod (also what an in-place update re-plans from).
pub fn plan(mut pod: Pod, default_runtime_class: &str) -> Result<PodPlan, ManifestError> {
    let meta = &mut pod.metadata;
    let name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(invalid("metadata.name", "required"));
    }
    dns_label("metadata.name", &name)?;
    let namespace = meta
        .namespace
        .get_or_insert_with(|| "default".into())
        .clone();
    dns_label("metadata.namespace", &namespace)?;
    if meta.uid.as_deref().is_some_and(str::is_empty) {
        meta.uid = None;
    }
    let uid = meta
        .uid
        .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
        .clone();
    // It names the pod's record and volume directory: no path tricks.
    let uid_ok = uid.len() <= 128
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !uid_ok {
        return Err(invalid(
            "metadata.uid",
            format!("{uid:?}: letters, digits, '-' and '_' only (at most 128)"),
        ));
    }
    let labels = meta.labels.clone().unwrap_or_default();
    let annotations = meta.annotations.clone().unwrap_or_default();
    let start_order = match annotations.get(START_ORDER_ANNOTATION) {
        None => None,
        Some(v) => Some(StartOrder::parse(v).ok_or_else(|| {
            invalid(
                format!("metadata.annotations[{START_ORDER_ANNOTATION}]"),
                format!("{v:?}: must be parallel or kubelet"),
            )
        })?),
    };
    let java_cache = match annotations
        .get(crate::javacache::ANNOTATION)
        .map(String::as_str)
    {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => {
            return Err(invalid(
                format!("metadata.annotations[{}]", crate::javacache::ANNOTATION),
                format!("{v:?}: must be on or off"),
            ))
        }
    };
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| invalid("spec", "required"))?;
    let runtime_class = spec
        .runtime_class_name
        .clone()
        .unwrap_or_else(|| default_runtime_class.to_string());
    if !matches!(runtime_class.as_str(), "kite" | "runc") {
        return Err(invalid(
            "spec.runtimeClassName",
            format!("{runtime_class:?}: kite runs kite and runc pods"),
        ));
    }
    let restart_policy = match spec.restart_policy.as_deref().unwrap_or("Always") {
        "Always" => RestartPolicy::Always,
        "OnFailure" => RestartPolicy::OnFailure,
        "Never" => RestartPolicy::Never,
        other => {
            return Err(invalid(
                "spec.restartPolicy",
                format!("{other:?}: must be Always, OnFailure or Never"),
            ))
        }
    };
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    let grace_period = Duration::from_secs(u64::try_from(grace).map_err(|_| {
        invalid(
            "spec.terminationGracePeriodSeconds",
            format!("{grace}: must not be negative"),
        )
    })?);
    let mut volumes = Vec::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let path = format!("spec.volumes[{i}]");
        dns_label(&format!("{path}.name"), &v.name)?;
        if v.empty_dir.is_none() {
            return Err(invalid(path, "kite supports emptyDir volumes only"));
        }
        if volumes.contains(&v.name) {
            return Err(invalid(
                format!("{path}.name"),
                format!("{:?} twice", v.name),
            ));
        }
        volumes.push(v.name.clone());
    }
    if spec.containers.is_empty() {
        return Err(invalid("spec.containers", "a pod needs a container"));
    }
    let mut containers: Vec<ContainerPlan> = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let plan = container_plan(&format!("spec.containers[{i}]"), c, &volumes)?;
        if containers.iter().any(|o| o.name == plan.name) {
            return Err(invalid(
                format!("spec.containers[{i}].name"),
                format!("{:?} twice", plan.name),
            ));
        }
        containers.push(plan);
    }
    Ok(PodPlan {
        namespace,
        name,
        uid,
        labels,
        annotations,
        runtime_class,
        restart_policy,
        grace_period,
        start_order,
        java_cache,
        containers,
        volumes,
        manifest: pod,
    })
}

fn resources(
    path: &str,
    map: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> Result<Resources, ManifestError> {
    let mut r = Resources::default();
    for (key, q) in map.into_iter().flatten() {
        let path = format!("{path}.{key}");
        match key.as_str() {
            "cpu" => {
                r.cpu_millis =
                    Some(quantity::cpu_millis(&q.0).map_err(|e| invalid(path, e.to_string()))?)
            }
            "memory" => {
                r.memory_bytes =
                    Some(quantity::bytes(&q.0).map_err(|e| invalid(path, e.to_string()))?)
            }
            _ => return Err(ManifestError::Unsupported { path }),
        }
    }
    Ok(r)
}

fn container_plan(
    path: &str,
    c: &Container,
    volumes: &[String],
) -> Result<ContainerPlan, ManifestError> {
    dns_label(&format!("{path}.name"), &c.name)?;
    let image = c.image.clone().unwrap_or_default();
    if image.trim().is_empty() {
        return Err(invalid(format!("{path}.image"), "required"));
    }
    if let Some(policy) = c.image_pull_policy.as_deref() {
        if !matches!(policy, "Always" | "IfNotPresent") {
            return Err(invalid(
                format!("{path}.imagePullPolicy"),
                format!("{policy:?}: kite pulls (Always or IfNotPresent)"),
            ));
        }
    }
    let mut ports: Vec<(Option<String>, u16)> = Vec::new();
    for (i, p) in c.ports.iter().flatten().enumerate() {
        let port = u16::try_from(p.container_port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                invalid(
                    format!("{path}.ports[{i}].containerPort"),
                    format!("{}: not a port", p.container_port),
                )
            })?;
        if p.protocol
            .as_deref()
            .is_some_and(|p| p != "TCP" && p != "UDP")
        {
            return Err(invalid(
                format!("{path}.ports[{i}].protocol"),
                "must be TCP or UDP",
            ));
        }
        ports.push((p.name.clone(), port));
    }
    let mut env = Vec::new();
    for (i, e) in c.env.iter().flatten().enumerate() {
        if e.name.is_empty() || e.name.contains('=') {
            return Err(invalid(
                format!("{path}.env[{i}].name"),
                "must be a name without '='",
            ));
        }
        env.push((e.name.clone(), e.value.clone().unwrap_or_default()));
    }
    let requests = resources(
        &format!("{path}.resources.requests"),
        c.resources.as_ref().and_then(|r| r.requests.as_ref()),
    )?;
    let limits = resources(
        &format!("{path}.resources.limits"),
        c.resources.as_ref().and_then(|r| r.limits.as_ref()),
    )?;
    if let (Some(req), Some(lim)) = (requests.cpu_millis, limits.cpu_millis) {
        if req > lim {
            return Err(invalid(
                format!("{path}.resources.requests.cpu"),
                format!("{req}m is above the limit {lim}m"),
            ));
        }
    }
    if let (Some(req), Some(lim)) = (requests.memory_bytes, limits.memory_bytes) {
        if req > lim {
            return Err(invalid(
                format!("{path}.resources.requests.memory"),
                format!(
                    "{} is above the limit {}",
                    quantity::format_bytes(req),
                    quantity::format_bytes(lim)
                ),
            ));
        }
    }
    let mut mounts = Vec::new();
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        if !volumes.contains(&m.name) {
            return Err(invalid(
                format!("{path}.volumeMounts[{i}].name"),
                format!("{:?} is not a volume of the pod", m.name),
            ));
        }
        if !m.mount_path.starts_with('/') {
            return Err(invalid(
                format!("{path}.volumeMounts[{i}].mountPath"),
                format!("{:?} is not an absolute path", m.mount_path),
            ));
        }
        mounts.push((
            m.name.clone(),
            m.mount_path.clone(),
            m.read_only.unwrap_or(false),
        ));
    }
    Ok(ContainerPlan {
        name: c.name.clone(),
        image,
        command: c.command.clone().unwrap_or_default(),
        args: c.args.clone().unwrap_or_default(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        env,
        requests,
        limits,
        readiness: probe_plan(
            &format!("{path}.readinessProbe"),
            c.readiness_probe.as_ref(),
            &ports,
        )?,
        liveness: probe_plan(
            &format!("{path}.livenessProbe"),
            c.liveness_probe.as_ref(),
            &ports,
        )?,
        mounts,
    })
}

fn probe_port(
    path: &str,
    port: &IntOrString,
    ports: &[(Option<String>, u16)],
) -> Result<u16, ManifestError> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| invalid(path, format!("{n}: not a port"))),
        IntOrString::String(name) => ports
            .iter()
            .find(|(n, _)| n.as_deref() == Some(name.as_str()))
            .map(|(_, p)| *p)
            .ok_or_else(|| invalid(path, format!("{name:?} is not a port of the container"))),
    }
}

fn probe_plan(
    path: &str,
    probe: Option<&Probe>,
    ports: &[(Option<String>, u16)],
) -> Result<Option<ProbePlan>, ManifestError> {
    let Some(p) = probe else { return Ok(None) };
    let mut actions = Vec::new();
    if let Some(h) = &p.http_get {
        if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            return Err(invalid(
                format!("{path}.httpGet.scheme"),
                "kite probes over HTTP",
            ));
        }
        actions.push(ProbeAction::Http {
            port: probe_port(&format!("{path}.httpGet.port"), &h.port, ports)?,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
        });
    }
    if let Some(t) = &p.tcp_socket {
        actions.push(ProbeAction::Tcp {
            port: probe_port(&format!("{path}.tcpSocket.port"), &t.port, ports)?,
        });
    }
    if let Some(e) = &p.exec {
        let command = e.command.clone().unwrap_or_default();
        if command.is_empty() {
            return Err(invalid(format!("{path}.exec.command"), "required"));
        }
        actions.push(ProbeAction::Exec { command });
    }
    if actions.len() != 1 {
        return Err(invalid(
            path,
            "needs exactly one of httpGet, tcpSocket, exec",
        ));
    }
    let secs =
        |field: &str, v: Option<i32>, default: i32, min: i32| -> Result<u32, ManifestError> {
            let v = v.unwrap_or(default);
            u32::try_from(v)
                .ok()
                .filter(|v| i32::try_from(*v).unwrap_or(i32::MAX) >= min)
                .ok_or_else(|| {
                    invalid(
                        format!("{path}.{field}"),
                        format!("{v}: must be at least {min}"),
                    )
                })
        };
    // Kubernetes' defaults.
    Ok(Some(ProbePlan {
        action: actions.remove(0),
        initial_delay: Duration::from_secs(
            secs("initialDelaySeconds", p.initial_delay_seconds, 0, 0)?.into(),
        ),
        period: Duration::from_secs(secs("periodSeconds", p.period_seconds, 10, 1)?.into()),
        timeout: Duration::from_secs(secs("timeoutSeconds", p.timeout_seconds, 1, 1)?.into()),
        success_threshold: secs("successThreshold", p.success_threshold, 1, 1)?,
        failure_threshold: secs("failureThreshold", p.failure_threshold, 3, 1)?,
    }))
}

/// Applies an in-place update to a pod's manifest: `container`'s image (when not empty) and
/// env values; gives the new plan.
pub fn with_update(
    current: &PodPlan,
    container: &str,
    image: &str,
    env: &BTreeMap<String, String>,
) -> Result<PodPlan, ManifestError> {
    let mut pod = current.manifest.clone();
    let spec = pod
        .spec
        .as_mut()
        .ok_or_else(|| invalid("spec", "required"))?;
    let c = spec
        .containers
        .iter_mut()
        .find(|c| c.name == container)
        .ok_or_else(|| {
            invalid(
                "container",
                format!("{container:?} is not a container of the pod"),
            )
        })?;
    if !image.is_empty() {
        c.image = Some(image.to_string());
    }
    if !env.is_empty() {
        let list = c.env.get_or_insert_with(Vec::new);
        for (k, v) in env {
            match list.iter_mut().find(|e| &e.name == k) {
                Some(e) => e.value = Some(v.clone()),
                None => list.push(k8s_openapi::api::core::v1::EnvVar {
                    name: k.clone(),
                    value: Some(v.clone()),
                    ..Default::default()
                }),
            }
        }
    }
    plan(pod, &current.runtime_class)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
  annotations: {kite.io/start-order: kubelet}
spec:
  runtimeClassName: runc
  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 5
  volumes:
  - name: data
    emptyDir: {}
  containers:
  - name: httpd
    image: 127.0.0.1:5000/kite/web-v1:latest
    command: [httpd]
    args: ["-f", "-p", "8080"]
    env:
    - {name: GREETING, value: hello}
    ports:
    - {name: http, containerPort: 8080}
    resources:
      requests: {cpu: 250m, memory: 64Mi}
      limits: {cpu: "1", memory: 128Mi}
    readinessProbe:
      httpGet: {path: /, port: http}
      periodSeconds: 1
    livenessProbe:
      tcpSocket: {port: 8080}
    volumeMounts:
    - {name: data, mountPath: /data}
"#;

    #[test]
    fn a_full_manifest_becomes_a_plan() {
        let p = parse(POD, "kite").unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("default", "web"));
        assert!(!p.uid.is_empty());
        assert_eq!(p.runtime_class, "runc");
        assert_eq!(p.restart_policy, RestartPolicy::OnFailure);
        assert_eq!(p.grace_period, Duration::from_secs(5));
        assert_eq!(p.start_order, Some(StartOrder::Kubelet));
        assert_eq!(p.volumes, vec!["data".to_string()]);
        let c = &p.containers[0];
        assert_eq!(c.args, vec!["-f", "-p", "8080"]);
        assert_eq!(c.env, vec![("GREETING".into(), "hello".into())]);
        assert_eq!(c.requests.cpu_millis, Some(250));
        assert_eq!(c.limits.memory_bytes, Some(128 << 20));
        let r = c.readiness.as_ref().unwrap();
        assert_eq!(
            r.action,
            ProbeAction::Http {
                port: 8080,
                path: "/".into()
            }
        );
        assert_eq!((r.period, r.failure_threshold), (Duration::from_secs(1), 3));
        assert_eq!(
            c.liveness.as_ref().unwrap().action,
            ProbeAction::Tcp { port: 8080 }
        );
        assert_eq!(c.mounts, vec![("data".into(), "/data".into(), false)]);
        assert_eq!(p.requests().cpu_millis, Some(250));
        // The manifest keeps the uid it was given.
        assert!(p.manifest_json().contains(&p.uid));
    }

    #[test]
    fn json_is_a_manifest_too() {
        let p = parse(
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"},"spec":{"containers":[{"name":"c","image":"busybox"}]}}"#,
            "kite",
        )
        .unwrap();
        assert_eq!(p.runtime_class, "kite");
        assert_eq!(p.restart_policy, RestartPolicy::Always);
    }

    fn err(text: &str) -> String {
        parse(text, "kite").unwrap_err().to_string()
    }

    #[test]
    fn unknown_and_unsupported_fields_are_named() {
        let e = err(&POD.replace("    image: ", "    imagee: x\n    image: "));
        assert_eq!(
            e,
            "spec.containers[0].imagee: unknown field (Kubernetes' v1/Pod has no such field)"
        );
        let e = err(&POD.replace("  restartPolicy", "  hostNetwork: true\n  restartPolicy"));
        assert_eq!(e, "spec.hostNetwork: not supported by kite");
        let e = err(&POD.replace("emptyDir: {}", "emptyDir: {medium: Memory}"));
        assert_eq!(e, "spec.volumes[0].emptyDir.medium: not supported by kite");
    }

    #[test]
    fn bad_values_are_named_with_the_reason() {
        let e = err(&POD.replace("memory: 64Mi", "memory: 64Zi"));
        assert!(
            e.starts_with(
                "spec.containers[0].resources.requests.memory: \"64Zi\" is not a quantity"
            ),
            "{e}"
        );
        let e = err(&POD.replace("    image: 127.0.0.1:5000/kite/web-v1:latest\n", ""));
        assert_eq!(e, "spec.containers[0].image: required");
        let e = err(&POD.replace(
            "terminationGracePeriodSeconds: 5",
            "terminationGracePeriodSeconds: soon",
        ));
        assert!(e.starts_with("spec.terminationGracePeriodSeconds: "), "{e}");
        let e = err(&POD.replace("port: http}", "port: web}"));
        assert!(
            e.contains("readinessProbe.httpGet.port: \"web\" is not a port"),
            "{e}"
        );
        let e = err(&POD.replace("cpu: 250m", "cpu: 2"));
        assert!(e.contains("2000m is above the limit 1000m"), "{e}");
        let e = err(&POD.replace("kind: Pod", "kind: Deployment"));
        assert_eq!(e, "the manifest is a v1/Deployment, not a v1/Pod");
        let e = err("name: [unclosed");
        assert!(e.starts_with("the manifest is not YAML or JSON"), "{e}");
        let e = err(&POD.replace("  name: web\n", "  name: web\n  uid: ../../etc\n"));
        assert!(e.starts_with("metadata.uid: \"../../etc\""), "{e}");
        let e = err(&POD.replace("name: web\n", "name: Web_1\n"));
        assert!(
            e.starts_with("metadata.name: \"Web_1\" is not a DNS label"),
            "{e}"
        );
    }

    #[test]
    fn an_update_changes_image_and_env_only() {
        let p = parse(POD, "kite").unwrap();
        let env = BTreeMap::from([
            ("GREETING".to_string(), "hi".to_string()),
            ("NEW".to_string(), "1".to_string()),
        ]);
        let u = with_update(&p, "httpd", "127.0.0.1:5000/kite/web-v2:latest", &env).unwrap();
        assert_eq!(u.uid, p.uid);
        let c = &u.containers[0];
        assert!(c.image.ends_with("web-v2:latest"));
        assert_eq!(
            c.env,
            vec![("GREETING".into(), "hi".into()), ("NEW".into(), "1".into())]
        );
        assert!(with_update(&p, "nope", "x", &BTreeMap::new()).is_err());
    }
}
