//! The node's label (`kite.io/runtime=true`), which the RuntimeClass `kite` schedules on: set
//! through the Kubernetes API with the DaemonSet's service account when the installer runs in a
//! cluster, taken away by uninstall.

use std::path::Path;

/// The label the installer sets, which the RuntimeClass `kite` (deploy/kubernetes) selects.
pub const DEFAULT_NODE_LABEL: &str = "kite.io/runtime=true";

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("label node {node}: {what}")]
    Api { node: String, what: String },
}

/// The merge patch that sets (`Some`) or removes (`None`) label `key` of a node.
pub fn patch_body(key: &str, value: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "metadata": { "labels": { key: value } } })
}

/// Splits `kite.io/runtime=true` into key and value.
pub fn parse_label(label: &str) -> Option<(&str, &str)> {
    label.split_once('=').filter(|(k, _)| !k.is_empty())
}

/// Where the API server is, when running in a pod with a service account; `None` outside one.
pub fn in_cluster() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    Path::new(SERVICE_ACCOUNT)
        .join("token")
        .exists()
        .then(|| format!("https://{}", join_host_port(&host, &port)))
}

fn join_host_port(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Sets or removes the label on `node` through the API server at `base`.
pub async fn apply(
    base: &str,
    node: &str,
    key: &str,
    value: Option<&str>,
) -> Result<(), LabelError> {
    let err = |what: String| LabelError::Api {
        node: node.to_string(),
        what,
    };
    let sa = Path::new(SERVICE_ACCOUNT);
    let token = std::fs::read_to_string(sa.join("token"))
        .map_err(|e| err(format!("read the service account's token: {e}")))?;
    let ca =
        std::fs::read(sa.join("ca.crt")).map_err(|e| err(format!("read the cluster's CA: {e}")))?;
    let ca = reqwest::Certificate::from_pem(&ca).map_err(|e| err(format!("cluster CA: {e}")))?;
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(std::time::Duration::from_secs(15))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let answer = client
        .patch(format!("{base}/api/v1/nodes/{node}"))
        .bearer_auth(token.trim())
        .header("Content-Type", "application/merge-patch+json")
        .body(patch_body(key, value).to_string())
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !answer.status().is_success() {
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        return Err(err(format!("{status}: {text}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_set_and_remove_one_label() {
        assert_eq!(
            patch_body("kite.io/runtime", Some("true")).to_string(),
            r#"{"metadata":{"labels":{"kite.io/runtime":"true"}}}"#
        );
        assert_eq!(
            patch_body("kite.io/runtime", None).to_string(),
            r#"{"metadata":{"labels":{"kite.io/runtime":null}}}"#
        );
        assert_eq!(
            parse_label("kite.io/runtime=true"),
            Some(("kite.io/runtime", "true"))
        );
        assert_eq!(parse_label("=x"), None);
        assert_eq!(join_host_port("fd00::1", "443"), "[fd00::1]:443");
    }
}
