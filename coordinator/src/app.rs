//! Apps: `apps/v1` Deployment manifests, checked, and what the controllers need of them: the
//! pods their template makes, their revisions, and how a change rolls out.
//!
//! The pod template must be a pod the node agent runs: it is checked with the agent's own
//! manifest parser (the same fields, the same errors, with the Deployment's path in front), so
//! a template a node would refuse is refused at `apply`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use kite_agent::manifest::{self, ManifestError, PodPlan};
use serde_json::{json, Value};

use crate::placement::Resources;

/// The annotation by which a Deployment chooses how a change of images or env rolls out:
/// `in-place` (the default) or `recreate`.
pub const ROLLOUT_ANNOTATION: &str = "kite.io/rollout";
/// Set on every pod the coordinator makes: the app it belongs to (`namespace/name`).
pub const APP_ANNOTATION: &str = "kite.io/app";
/// Why a revision was made (kubectl's convention).
pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("the manifest is not YAML or JSON: {0}")]
    Syntax(String),
    #[error("the manifest is a {api_version}/{kind}, not an apps/v1 Deployment")]
    NotADeployment { api_version: String, kind: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("spec.template: {0}")]
    Template(#[source] ManifestError),
}

fn invalid(path: &str, reason: impl Into<String>) -> AppError {
    AppError::Invalid {
        path: path.into(),
        reason: reason.into(),
    }
}

/// How a new revision replaces the old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Strategy {
    /// The pods keep their sandbox (VM, IP, volumes); their containers are replaced.
    InPlace,
    /// New pods replace old ones.
    Recreate,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::InPlace => "InPlace",
            Strategy::Recreate => "Recreate",
        }
    }
}

/// A Deployment, checked, in the coordinator's terms.
#[derive(Clone, Debug)]
pub struct AppSpec {
    pub namespace: String,
    pub name: String,
    pub replicas: u32,
    /// The pod template (a `v1/PodTemplateSpec`, JSON).
    pub template: Value,
    /// The strategy the Deployment asks for when a change could go in place.
    pub prefer_recreate: bool,
    /// `maxUnavailable` as given (an int or a percentage).
    pub max_unavailable: Value,
    pub progress_deadline_secs: u64,
    pub revision_history_limit: usize,
    pub change_cause: String,
    /// The manifest as applied (JSON).
    pub manifest: Value,
}

impl AppSpec {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Parses and checks a Deployment manifest (YAML or JSON).
pub fn parse(text: &str) -> Result<AppSpec, AppError> {
    let value: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| AppError::Syntax(e.to_string()))?
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| AppError::Syntax(e.to_string()))?
    };
    let field = |k: &str| {
        value
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != "apps/v1" || kind != "Deployment" {
        return Err(AppError::NotADeployment { api_version, kind });
    }
    let deployment: Deployment = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| invalid(&e.path().to_string(), e.inner().to_string()))?;
    let meta = &deployment.metadata;
    let name = meta.name.clone().unwrap_or_default();
    check_label("metadata.name", &name)?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    check_label("metadata.namespace", &namespace)?;
    let spec = deployment
        .spec
        .as_ref()
        .ok_or_else(|| invalid("spec", "required"))?;
    let replicas = u32::try_from(spec.replicas.unwrap_or(1))
        .map_err(|_| invalid("spec.replicas", "must not be negative"))?;
    // Kubernetes requires the selector to match the template's labels; kite keeps the rule
    // (the same manifest must mean the same on both).
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    if selector.is_empty() {
        return Err(invalid("spec.selector.matchLabels", "required"));
    }
    if spec.selector.match_expressions.is_some() {
        return Err(invalid(
            "spec.selector.matchExpressions",
            "not supported by kite",
        ));
    }
    for (k, v) in &selector {
        if labels.get(k) != Some(v) {
            return Err(invalid(
                "spec.template.metadata.labels",
                format!("does not match spec.selector ({k}={v})"),
            ));
        }
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let prefer_recreate = match annotations.get(ROLLOUT_ANNOTATION).map(String::as_str) {
        None | Some("in-place") => false,
        Some("recreate") => true,
        Some(other) => {
            return Err(invalid(
                &format!("metadata.annotations[{ROLLOUT_ANNOTATION}]"),
                format!("{other:?} is not in-place or recreate"),
            ))
        }
    };
    let strategy = spec.strategy.as_ref();
    let strategy_type = strategy.and_then(|s| s.type_.clone());
    let prefer_recreate = prefer_recreate || strategy_type.as_deref() == Some("Recreate");
    if let Some(t) = strategy_type.as_deref() {
        if t != "Recreate" && t != "RollingUpdate" {
            return Err(invalid(
                "spec.strategy.type",
                format!("{t:?} is not RollingUpdate or Recreate"),
            ));
        }
    }
    let max_unavailable = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.as_ref())
        .map(|m| serde_json::to_value(m).expect("IntOrString serializes"))
        .unwrap_or_else(|| json!("25%"));
    batch_size(&max_unavailable, 4)
        .map_err(|r| invalid("spec.strategy.rollingUpdate.maxUnavailable", r))?;
    let progress_deadline_secs = u64::try_from(spec.progress_deadline_seconds.unwrap_or(600))
        .map_err(|_| invalid("spec.progressDeadlineSeconds", "must not be negative"))?;
    let revision_history_limit = usize::try_from(spec.revision_history_limit.unwrap_or(10))
        .map_err(|_| invalid("spec.revisionHistoryLimit", "must not be negative"))?;
    let template = serde_json::to_value(&spec.template).expect("a template serializes");
    // The template must be a pod a node runs.
    let probe = pod_manifest(&template, &namespace, &name, &format!("{name}-check"));
    let plan = check_pod(&probe)?;
    if plan.containers.is_empty() {
        return Err(invalid("spec.template.spec.containers", "required"));
    }
    Ok(AppSpec {
        change_cause: annotations.get(CHANGE_CAUSE).cloned().unwrap_or_default(),
        namespace,
        name,
        replicas,
        template,
        prefer_recreate,
        max_unavailable,
        progress_deadline_secs,
        revision_history_limit,
        manifest: value,
    })
}

fn check_label(path: &str, s: &str) -> Result<(), AppError> {
    if manifest::is_dns_label(s, 50) {
        Ok(())
    } else {
        Err(invalid(
            path,
            format!("{s:?} is not a DNS label of at most 50 characters (pods add a suffix)"),
        ))
    }
}

/// Checks a pod manifest the way the node agent will.
pub fn check_pod(pod: &Value) -> Result<PodPlan, AppError> {
    manifest::parse(&pod.to_string(), "kite").map_err(AppError::Template)
}

/// The v1/Pod a template makes for the pod `pod_name` of the app `namespace/app`.
pub fn pod_manifest(template: &Value, namespace: &str, app: &str, pod_name: &str) -> Value {
    let mut metadata = template
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let meta = metadata.as_object_mut().expect("metadata is an object");
    meta.insert("name".into(), json!(pod_name));
    meta.insert("namespace".into(), json!(namespace));
    let annotations = meta
        .entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("annotations are a map");
    annotations.insert(APP_ANNOTATION.into(), json!(format!("{namespace}/{app}")));
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    })
}

/// What placement needs of a template: its requests, runtime class and images.
pub fn requests_of(template: &Value) -> (Resources, String, Vec<String>) {
    let probe = pod_manifest(template, "default", "app", "app-probe");
    match check_pod(&probe) {
        Ok(plan) => {
            let r = plan.requests();
            (
                Resources {
                    cpu_millis: r.cpu_millis.unwrap_or(0),
                    memory_bytes: r.memory_bytes.unwrap_or(0),
                },
                plan.runtime_class.clone(),
                plan.containers.iter().map(|c| c.image.clone()).collect(),
            )
        }
        // Checked at apply; a template that no longer parses places as empty.
        Err(_) => (Resources::default(), "kite".into(), Vec::new()),
    }
}

/// The containers' images of a template, by container.
pub fn images_of(template: &Value) -> BTreeMap<String, String> {
    kite_agent::link::container_specs(template)
        .into_iter()
        .map(|(name, (image, _))| (name, image))
        .collect()
}

fn containers(template: &Value) -> Vec<Value> {
    template
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Whether `new` differs from `old` only in its containers' images and env values (added or
/// changed; a removed variable cannot be unset in place) — what a pod can take without a new
/// sandbox.
pub fn in_place_possible(old: &Value, new: &Value) -> bool {
    let strip = |t: &Value| {
        let mut t = t.clone();
        if let Some(cs) = t
            .pointer_mut("/spec/containers")
            .and_then(Value::as_array_mut)
        {
            for c in cs {
                if let Some(c) = c.as_object_mut() {
                    c.remove("image");
                    c.remove("env");
                }
            }
        }
        t
    };
    if strip(old) != strip(new) {
        return false;
    }
    let env_names = |c: &Value| -> Vec<String> {
        c.get("env")
            .and_then(Value::as_array)
            .map(|e| {
                e.iter()
                    .filter_map(|v| v.get("name")?.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (old_cs, new_cs) = (containers(old), containers(new));
    old_cs.iter().zip(&new_cs).all(|(o, n)| {
        let kept = env_names(n);
        // Only plain values can be set in place.
        let plain = n
            .get("env")
            .and_then(Value::as_array)
            .is_none_or(|e| e.iter().all(|v| v.get("valueFrom").is_none()));
        plain && env_names(o).iter().all(|name| kept.contains(name))
    })
}

/// How many pods a batch may take down: `maxUnavailable` (an int, or a percentage of
/// `replicas` rounded down, as Kubernetes does) but at least one.
pub fn batch_size(max_unavailable: &Value, replicas: u32) -> Result<u32, String> {
    let n = match max_unavailable {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{n} is not a count"))?,
        Value::String(s) => {
            let pct: u32 = s
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .filter(|p| *p <= 100)
                .ok_or_else(|| format!("{s:?} is not a count or a percentage"))?;
            replicas * pct / 100
        }
        other => return Err(format!("{other} is not a count or a percentage")),
    };
    Ok(n.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      runtimeClassName: runc
      containers:
      - name: web
        image: 127.0.0.1:5000/kite/web:v1
        env: [{name: COLOR, value: blue}]
        resources:
          requests: {cpu: 100m, memory: 64Mi}
"#;

    #[test]
    fn a_deployment_is_checked_and_its_pods_are_what_the_agent_runs() {
        let app = parse(APP).unwrap();
        assert_eq!(
            (app.namespace.as_str(), app.name.as_str(), app.replicas),
            ("default", "web", 3)
        );
        let pod = pod_manifest(&app.template, "default", "web", "web-abcde");
        let plan = check_pod(&pod).unwrap();
        assert_eq!(plan.name, "web-abcde");
        assert_eq!(plan.annotations.get(APP_ANNOTATION).unwrap(), "default/web");
        let (r, class, images) = requests_of(&app.template);
        assert_eq!((r.cpu_millis, r.memory_bytes), (100, 64 << 20));
        assert_eq!(class, "runc");
        assert_eq!(images, vec!["127.0.0.1:5000/kite/web:v1".to_string()]);
    }

    #[test]
    fn bad_deployments_say_where() {
        let e = parse("apiVersion: v1\nkind: Pod\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an apps/v1 Deployment"), "{e}");
        let e = parse(&APP.replace("matchLabels: {app: web}", "matchLabels: {app: other}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match spec.selector"), "{e}");
        let e = parse(&APP.replace("replicas: 3", "replicas: -1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.replicas"), "{e}");
        let e = parse(&APP.replace("runtimeClassName: runc", "hostNetwork: true"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("spec.template: "), "{e}");
        assert!(e.contains("hostNetwork"), "{e}");
        let e = parse(&APP.replace(
            "name: web\nspec",
            "name: web\n  annotations: {kite.io/rollout: sideways}\nspec",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("kite.io/rollout"), "{e}");
    }

    #[test]
    fn images_and_env_go_in_place_the_rest_recreates() {
        let v1 = parse(APP).unwrap().template;
        let v2 = parse(
            &APP.replace("web:v1", "web:v2")
                .replace("value: blue", "value: green"),
        )
        .unwrap()
        .template;
        assert!(in_place_possible(&v1, &v2));
        let more_env = parse(&APP.replace(
            "env: [{name: COLOR, value: blue}]",
            "env: [{name: COLOR, value: blue}, {name: SIZE, value: L}]",
        ))
        .unwrap()
        .template;
        assert!(in_place_possible(&v1, &more_env));
        // A removed variable cannot be unset in place.
        assert!(!in_place_possible(&more_env, &v1));
        let more_cpu = parse(&APP.replace("cpu: 100m", "cpu: 200m"))
            .unwrap()
            .template;
        assert!(!in_place_possible(&v1, &more_cpu));
        let specs = kite_agent::link::container_specs(&v2);
        assert_eq!(specs["web"].0, "127.0.0.1:5000/kite/web:v2");
        assert_eq!(specs["web"].1["COLOR"], "green");
    }

    #[test]
    fn batches_follow_max_unavailable() {
        assert_eq!(batch_size(&json!("25%"), 4), Ok(1));
        assert_eq!(batch_size(&json!("50%"), 6), Ok(3));
        assert_eq!(batch_size(&json!("10%"), 3), Ok(1));
        assert_eq!(batch_size(&json!(2), 6), Ok(2));
        assert_eq!(batch_size(&json!(0), 6), Ok(1));
        assert!(batch_size(&json!("x%"), 6).is_err());
    }
}
