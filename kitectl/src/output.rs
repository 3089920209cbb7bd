//! What kitectl prints: kubectl's tables, the v1/Pod object, `describe`, and a start's
//! waterfall.

use std::fmt::Write;

use kite_protocol::node::{Pod, Stage};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// kubectl's AGE: 45s, 3m12s, 5h, 2d.
pub fn age(since_ms: i64, now_ms: i64) -> String {
    let s = (now_ms - since_ms).max(0) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=599 => format!("{}m{}s", s / 60, s % 60),
        600..=10_799 => format!("{}m", s / 60),
        10_800..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The STATUS column: the phase, or what holds a container (CrashLoopBackOff, …).
fn status_text(p: &Pod) -> String {
    p.containers
        .iter()
        .find(|c| c.state == "waiting" && !c.reason.is_empty() && c.reason != "ContainerCreating")
        .map(|c| c.reason.clone())
        .unwrap_or_else(|| p.phase.clone())
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}   ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `get pods`: NAME READY STATUS RESTARTS AGE (wide: IP RUNTIME ORDER SANDBOX).
pub fn pod_table(pods: &[Pod], wide: bool, namespaces: bool) -> String {
    let now = now_ms();
    let mut header: Vec<String> = Vec::new();
    if namespaces {
        header.push("NAMESPACE".into());
    }
    header.extend(["NAME", "READY", "STATUS", "RESTARTS", "AGE"].map(String::from));
    if wide {
        header.extend(["IP", "RUNTIME", "START", "SANDBOX"].map(String::from));
    }
    let mut rows = vec![header];
    for p in pods {
        let mut row = Vec::new();
        if namespaces {
            row.push(p.namespace.clone());
        }
        let ready = p.containers.iter().filter(|c| c.ready).count();
        row.push(p.name.clone());
        row.push(format!("{ready}/{}", p.containers.len()));
        row.push(status_text(p));
        row.push(
            p.containers
                .iter()
                .map(|c| c.restart_count)
                .sum::<u32>()
                .to_string(),
        );
        row.push(age(p.created_unix_ms, now));
        if wide {
            row.push(if p.ip.is_empty() {
                "<none>".into()
            } else {
                p.ip.clone()
            });
            row.push(p.runtime_class.clone());
            row.push(p.start_order.clone());
            row.push(p.sandbox_id.chars().take(13).collect());
        }
        rows.push(row);
    }
    table(&rows)
}

/// An event's time of day (UTC, with milliseconds).
pub fn clock(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    let text = humantime::format_rfc3339_millis(t).to_string();
    text.get(11..23).unwrap_or(&text).to_string()
}

fn rfc3339(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The pod as a v1/Pod object: its manifest with a status in Kubernetes' shape.
pub fn pod_object(p: &Pod) -> serde_json::Value {
    let mut object: serde_json::Value = serde_json::from_str(&p.manifest_json).unwrap_or_else(|_| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p.name, "namespace": p.namespace}})
    });
    object["metadata"]["creationTimestamp"] = rfc3339(p.created_unix_ms).into();
    let containers: Vec<serde_json::Value> = p
        .containers
        .iter()
        .map(|c| {
            let state = match c.state.as_str() {
                "running" => serde_json::json!({"running": {"startedAt": rfc3339(c.started_unix_ms)}}),
                "terminated" => serde_json::json!({"terminated": {"exitCode": c.exit_code, "reason": c.reason}}),
                _ => serde_json::json!({"waiting": {"reason": c.reason}}),
            };
            serde_json::json!({
                "name": c.name,
                "image": c.image,
                "imageID": c.image_id,
                "containerID": if c.container_id.is_empty() { String::new() } else { format!("containerd://{}", c.container_id) },
                "ready": c.ready,
                "restartCount": c.restart_count,
                "state": state,
            })
        })
        .collect();
    object["status"] = serde_json::json!({
        "phase": p.phase,
        "podIP": p.ip,
        "conditions": [{"type": "Ready", "status": if p.ready { "True" } else { "False" }}],
        "containerStatuses": containers,
    });
    object
}

/// One stage as `run` prints it while a pod starts.
pub fn stage_line(s: &Stage) -> String {
    let detail = if s.detail.is_empty() {
        String::new()
    } else {
        format!("  ({})", s.detail)
    };
    format!(
        "{:<16} {:>6} ms  (at {} ms){detail}",
        s.name, s.duration_ms, s.start_ms
    )
}

/// The start (and updates) as bars on one time axis.
pub fn waterfall(stages: &[Stage], width: usize) -> String {
    let end = stages
        .iter()
        .map(|s| s.start_ms + s.duration_ms)
        .max()
        .unwrap_or(0)
        .max(1);
    let name_width = stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for s in stages {
        let scale =
            |ms: i64| usize::try_from(ms * i64::try_from(width).unwrap_or(0) / end).unwrap_or(0);
        let from = scale(s.start_ms).min(width);
        let len = scale(s.duration_ms).max(1).min(width - from.min(width - 1));
        let bar: String =
            " ".repeat(from) + &"█".repeat(len) + &" ".repeat(width.saturating_sub(from + len));
        let _ = writeln!(
            out,
            "  {:<name_width$} |{bar}| {:>6} ms  {:>6} → {:<6}{}",
            s.name,
            s.duration_ms,
            s.start_ms,
            s.start_ms + s.duration_ms,
            if s.detail.is_empty() {
                String::new()
            } else {
                format!("  {}", s.detail)
            }
        );
    }
    out
}

pub fn describe(p: &Pod) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Name:          {}", p.name);
    let _ = writeln!(out, "Namespace:     {}", p.namespace);
    let _ = writeln!(out, "UID:           {}", p.uid);
    let _ = writeln!(
        out,
        "Runtime:       {} ({} start)",
        p.runtime_class, p.start_order
    );
    let _ = writeln!(out, "Created:       {}", rfc3339(p.created_unix_ms));
    let _ = writeln!(out, "Status:        {}", status_text(p));
    let _ = writeln!(
        out,
        "Ready:         {}",
        if p.ready { "True" } else { "False" }
    );
    let _ = writeln!(
        out,
        "IP:            {}",
        if p.ip.is_empty() { "<none>" } else { &p.ip }
    );
    let _ = writeln!(
        out,
        "Sandbox:       {}",
        if p.sandbox_id.is_empty() {
            "<none>"
        } else {
            &p.sandbox_id
        }
    );
    if !p.message.is_empty() {
        let _ = writeln!(out, "Message:       {}", p.message);
    }
    let _ = writeln!(out, "Containers:");
    for c in &p.containers {
        let _ = writeln!(out, "  {}:", c.name);
        let _ = writeln!(out, "    Image:          {}", c.image);
        let _ = writeln!(out, "    Image ID:       {}", c.image_id);
        let _ = writeln!(out, "    Container ID:   {}", c.container_id);
        let state = if c.reason.is_empty() {
            c.state.clone()
        } else {
            format!("{} ({})", c.state, c.reason)
        };
        let _ = writeln!(out, "    State:          {state}");
        if c.state == "terminated" {
            let _ = writeln!(out, "    Exit Code:      {}", c.exit_code);
        }
        let _ = writeln!(out, "    Ready:          {}", c.ready);
        let _ = writeln!(out, "    Restart Count:  {}", c.restart_count);
        if !c.env.is_empty() {
            let _ = writeln!(out, "    Environment:");
            let mut env: Vec<_> = c.env.iter().collect();
            env.sort();
            for (k, v) in env {
                let _ = writeln!(out, "      {k}: {v}");
            }
        }
    }
    if !p.stages.is_empty() {
        let _ = writeln!(
            out,
            "Start (ms from the bind; an update's stages from its request):"
        );
        // The start, then each update, on its own axis.
        let mut groups: Vec<Vec<Stage>> = Vec::new();
        for s in &p.stages {
            let update = s.name.starts_with("update/");
            match groups.last_mut() {
                Some(g)
                    if g.last().is_some_and(|l| {
                        l.name.starts_with("update/") == update
                            && !(update && s.name == "update/pull")
                    }) =>
                {
                    g.push(s.clone())
                }
                _ => groups.push(vec![s.clone()]),
            }
        }
        for g in groups {
            out.push_str(&waterfall(&g, 40));
        }
    }
    let _ = writeln!(out, "Events:");
    let now = now_ms();
    let mut rows = vec![["AGE", "TYPE", "REASON", "CONTAINER", "MESSAGE"]
        .map(String::from)
        .to_vec()];
    for e in &p.events {
        rows.push(vec![
            age(e.unix_ms, now),
            e.r#type.clone(),
            e.reason.clone(),
            if e.container.is_empty() {
                "-".into()
            } else {
                e.container.clone()
            },
            e.message.clone(),
        ]);
    }
    for line in table(&rows).lines() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, start: i64, duration: i64) -> Stage {
        Stage {
            name: name.into(),
            start_ms: start,
            duration_ms: duration,
            detail: String::new(),
        }
    }

    #[test]
    fn waterfall_bars_sit_on_one_axis() {
        let w = waterfall(&[stage("sandbox", 0, 100), stage("start/c", 100, 100)], 10);
        let lines: Vec<&str> = w.lines().collect();
        assert!(lines[0].contains("|█████     |"), "{w}");
        assert!(lines[1].contains("|     █████|"), "{w}");
    }

    #[test]
    fn ages_and_times_read_like_kubectl() {
        assert_eq!(age(0, 45_000), "45s");
        assert_eq!(age(0, 192_000), "3m12s");
        assert_eq!(age(0, 5 * 3_600_000), "5h");
        assert_eq!(rfc3339(1_796_037_241_397), "2026-11-30T11:14:01Z");
    }

    #[test]
    fn the_table_has_kubectl_columns() {
        let pod = Pod {
            name: "web".into(),
            phase: "Running".into(),
            containers: vec![kite_protocol::node::ContainerStatus {
                name: "c".into(),
                ready: true,
                restart_count: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = pod_table(&[pod], false, false);
        let mut lines = t.lines();
        assert!(
            lines
                .next()
                .unwrap()
                .starts_with("NAME   READY   STATUS    RESTARTS   AGE"),
            "{t}"
        );
        assert!(
            lines
                .next()
                .unwrap()
                .starts_with("web    1/1     Running   2"),
            "{t}"
        );
    }
}
