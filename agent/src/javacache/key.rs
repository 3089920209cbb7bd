//! The cache's key: everything that decides whether a JVM accepts an archive and what the
//! archive holds, so that two pods of the same app and size share one and nothing else gets it.
//!
//! - The image (its id: the digest of its config, which names every layer's uncompressed
//!   digest, so it changes whenever any file does). Required: the JVM checks a jar's size and
//!   mtime, not its contents, and would serve stale classes from a rebuilt jar.
//! - The command, args and working directory (the class path and main class, relative paths).
//! - The environment the JVM, its launcher and the usual start scripts read options from
//!   (agents, module options, heap flags).
//! - The resources that steer the JVM's ergonomics (memory → heap → compressed pointers; CPUs →
//!   collector) and the runtime class (a kite VM's memory is not a runc cgroup's).
//!
//! The JDK and the archive method follow from the image and are recorded with the archive.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::manifest::ContainerPlan;

/// Environment variables whose values the JVM or its start scripts turn into JVM options.
pub const JVM_ENV: &[&str] = &[
    "JAVA_TOOL_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "_JAVA_OPTIONS",
    "JAVA_OPTS",
    "CATALINA_OPTS",
    "CLASSPATH",
    "JAVA_HOME",
];

/// A key: 64 hex digits (sha256 of its parts).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppKey(String);

impl AppKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 digits, for names and messages.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }

    /// A key read back from the index (only 64 lowercase hex digits are keys).
    pub fn parse(s: &str) -> Option<AppKey> {
        (s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| AppKey(s.to_string()))
    }
}

impl std::fmt::Display for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Serialize)]
struct KeyParts<'a> {
    /// Bumped when what goes into a key changes (old archives then stop matching).
    version: u32,
    runtime_class: &'a str,
    image_id: &'a str,
    command: &'a [String],
    args: &'a [String],
    working_dir: &'a str,
    jvm_env: BTreeMap<&'a str, &'a str>,
    cpu_limit_millis: Option<u64>,
    cpu_request_millis: Option<u64>,
    memory_limit_bytes: Option<u64>,
    memory_request_bytes: Option<u64>,
}

/// The key of container `c` of a pod of `runtime_class`, running image `image_id`.
pub fn app_key(runtime_class: &str, image_id: &str, c: &ContainerPlan) -> AppKey {
    let jvm_env = c
        .env
        .iter()
        .filter(|(k, _)| JVM_ENV.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let parts = KeyParts {
        version: 1,
        runtime_class,
        image_id,
        command: &c.command,
        args: &c.args,
        working_dir: &c.working_dir,
        jvm_env,
        cpu_limit_millis: c.limits.cpu_millis,
        cpu_request_millis: c.requests.cpu_millis,
        memory_limit_bytes: c.limits.memory_bytes,
        memory_request_bytes: c.requests.memory_bytes,
    };
    let json = serde_json::to_vec(&parts).expect("key parts serialise");
    let digest = Sha256::digest(&json);
    AppKey(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Class-path entries of the container's own command line that the JVM cannot dump an archive
/// with: directories (`-cp classes:…`; the JVM refuses non-empty ones at dump time). A jar's
/// name ends in .jar or .zip; `dir/*` is a wildcard of jars. Entries the command line does not
/// show (a start script's) are caught when the training's dump fails.
pub fn undumpable_class_path(c: &ContainerPlan) -> Option<String> {
    let words: Vec<&String> = c.command.iter().chain(&c.args).collect();
    let mut paths: Vec<String> = Vec::new();
    for (n, w) in words.iter().enumerate() {
        if matches!(w.as_str(), "-cp" | "-classpath" | "--class-path") {
            if let Some(next) = words.get(n + 1) {
                paths.push(next.to_string());
            }
        } else if let Some(v) = w.strip_prefix("--class-path=") {
            paths.push(v.to_string());
        }
    }
    if !words
        .iter()
        .any(|w| ["-cp", "-classpath", "-jar"].contains(&w.as_str()))
    {
        if let Some((_, v)) = c.env.iter().find(|(k, _)| k == "CLASSPATH") {
            paths.push(v.clone());
        }
    }
    paths
        .iter()
        .flat_map(|p| p.split(':'))
        .filter(|e| !e.is_empty())
        .find(|e| {
            let e = e.to_ascii_lowercase();
            !(e.ends_with(".jar") || e.ends_with(".zip") || e.ends_with("/*") || e == "*")
        })
        .map(|e| {
            format!("class path entry {e:?} is a directory: the JVM cannot dump an archive with a non-empty directory on the class path")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Resources;

    fn container(args: &[&str], env: &[(&str, &str)], memory: Option<u64>) -> ContainerPlan {
        ContainerPlan {
            name: "app".into(),
            image: "reg/app:1".into(),
            command: vec!["java".into()],
            args: args.iter().map(|s| s.to_string()).collect(),
            working_dir: String::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            requests: Resources::default(),
            limits: Resources {
                cpu_millis: None,
                memory_bytes: memory,
            },
            readiness: None,
            liveness: None,
            mounts: Vec::new(),
        }
    }

    #[test]
    fn same_app_same_key_and_each_part_counts() {
        let base = container(&["-jar", "app.jar"], &[("GREETING", "hi")], Some(512 << 20));
        let k = app_key("runc", "sha256:aa", &base);
        assert_eq!(k, app_key("runc", "sha256:aa", &base.clone()));
        // Env the JVM does not read is not part of it.
        let other_env = container(&["-jar", "app.jar"], &[("GREETING", "ho")], Some(512 << 20));
        assert_eq!(k, app_key("runc", "sha256:aa", &other_env));
        let differs = [
            app_key("runc", "sha256:bb", &base),
            app_key("kite", "sha256:aa", &base),
            app_key(
                "runc",
                "sha256:aa",
                &container(&["-jar", "b.jar"], &[], Some(512 << 20)),
            ),
            app_key(
                "runc",
                "sha256:aa",
                &container(
                    &["-jar", "app.jar"],
                    &[("JAVA_TOOL_OPTIONS", "-Xmx40g")],
                    Some(512 << 20),
                ),
            ),
            app_key(
                "runc",
                "sha256:aa",
                &container(&["-jar", "app.jar"], &[], Some(4 << 30)),
            ),
        ];
        for d in &differs {
            assert_ne!(&k, d);
        }
        assert_eq!(AppKey::parse(k.as_str()), Some(k.clone()));
        assert_eq!(AppKey::parse("../etc"), None);
    }

    #[test]
    fn directories_on_the_class_path_are_found_up_front() {
        let dir = container(&["-cp", "/app/classes:/app/lib/*", "Main"], &[], None);
        assert!(undumpable_class_path(&dir)
            .unwrap()
            .contains("/app/classes"));
        for ok in [
            container(&["-cp", "/app/a.jar:/app/lib/*", "Main"], &[], None),
            container(
                &["-jar", "/app/app.jar"],
                &[("CLASSPATH", "/x/classes")],
                None,
            ),
            container(&["Main"], &[("CLASSPATH", "/x/a.jar")], None),
        ] {
            assert_eq!(undumpable_class_path(&ok), None);
        }
        let env = container(&["Main"], &[("CLASSPATH", "/x/classes")], None);
        assert!(undumpable_class_path(&env).is_some());
    }
}
