//! What a JVM's own unified log (`-Xlog:…:file=…`) says about it: its version and compressed
//! pointers (`gc+init`), and whether it mapped the archive it was given (`cds` on JDK 13–23,
//! `aot` on JDK 24+). The JVM's stdout is the app's and is never read for this.
//!
//! The markers are HotSpot's own messages, checked against JDK 17 and JDK 25 (see the tests):
//! an archive counts as mapped only when the JVM says it opened that very file and no line
//! says it gave it up afterwards.

use std::path::Path;

/// A JVM's verdict on the archive it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchiveVerdict {
    /// The log does not mention the archive (not given one, or not a JVM that reads the flags).
    NotMentioned,
    /// Opened and kept.
    Mapped,
    /// Opened (or tried) and given up, with the JVM's words.
    Rejected(String),
}

/// What one JVM's log says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JvmLog {
    /// `17.0.15+6-Debian-1deb12u1`
    pub version: Option<String>,
    /// The feature release: 17, 25.
    pub feature: Option<u32>,
    pub compressed_oops: Option<bool>,
    pub archive: ArchiveVerdict,
    /// `[error…]` lines (a dump that failed says why there).
    pub errors: Vec<String>,
}

/// Messages by which HotSpot gives an archive up (or fails to write one).
const FAILURES: &[&str] = &[
    "Unable to use shared archive",
    "The top archive failed to load",
    "Unable to use AOT cache",
    "An error has occurred while processing the AOT cache",
    "An error has occurred while processing the shared archive file",
    "Loading static archive failed",
    "Unable to map shared spaces",
    "is not the one used while building",
    "mismatch",
    "non-empty directory",
];

/// The message of a log line: what follows its decorations (`[0.036s][info][cds ] `).
fn message(line: &str) -> &str {
    let mut rest = line;
    while let Some(stripped) = rest.strip_prefix('[') {
        match stripped.find(']') {
            Some(end) => rest = stripped[end + 1..].trim_start_matches(' '),
            None => break,
        }
    }
    rest
}

/// Whether a line is a continuation of the previous message (its decorations are blank).
fn continuation(line: &str) -> bool {
    line.starts_with("[ ") && line[1..].trim_start().starts_with(']')
}

/// The feature release of a HotSpot version string (`17.0.15+6…` → 17; `1.8.0_392` → 8).
pub fn feature_release(version: &str) -> Option<u32> {
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let first: u32 = parts.next()?.parse().ok()?;
    if first == 1 {
        return parts.next()?.parse().ok();
    }
    Some(first)
}

/// Parses a JVM log. `archive` is the path the JVM was given (as the container sees it).
pub fn parse(text: &str, archive: Option<&str>) -> JvmLog {
    let mut log = JvmLog {
        version: None,
        feature: None,
        compressed_oops: None,
        archive: ArchiveVerdict::NotMentioned,
        errors: Vec::new(),
    };
    let mut opened = false;
    let mut rejection: Option<String> = None;
    let lines: Vec<&str> = text.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let msg = message(line);
        if let Some(v) = msg.strip_prefix("Version: ") {
            let v = v.split_whitespace().next().unwrap_or_default();
            if log.version.is_none() {
                log.version = Some(v.to_string());
                log.feature = feature_release(v);
            }
        } else if let Some(v) = msg.strip_prefix("Compressed Oops: ") {
            log.compressed_oops = Some(v.starts_with("Enabled"));
        }
        if let Some(path) = archive {
            if msg == format!("Opened archive {path}.")
                || msg == format!("Opened AOT cache {path}.")
            {
                opened = true;
            }
        }
        if line.contains("][error") {
            log.errors.push(msg.to_string());
        }
        if rejection.is_none() && FAILURES.iter().any(|f| msg.contains(f)) {
            // The reason, with the continuation lines HotSpot splits it over.
            let mut reason = msg.trim().to_string();
            for next in lines[n + 1..].iter().take_while(|l| continuation(l)) {
                reason.push(' ');
                reason.push_str(message(next).trim());
            }
            rejection = Some(reason);
        }
    }
    if archive.is_some() {
        log.archive = match (opened, rejection) {
            (_, Some(reason)) => ArchiveVerdict::Rejected(reason),
            (true, None) => ArchiveVerdict::Mapped,
            (false, None) => ArchiveVerdict::NotMentioned,
        };
    }
    log
}

/// The logs of every JVM a container ran (`jvm-<pid>.log` in `dir`), oldest first.
pub fn read_dir(dir: &Path, prefix: &str, archive: Option<&str>) -> Vec<JvmLog> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(prefix) && name.ends_with(".log")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    files.sort();
    files
        .into_iter()
        // Bounded: a log is HotSpot's, but the container could write anything there.
        .filter_map(|(_, p)| read_bounded(&p, 4 << 20))
        .map(|text| parse(&text, archive))
        .collect()
}

fn read_bounded(path: &Path, max: u64) -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The verdict over all of a container's JVMs: any rejection wins, then any mapping.
pub fn combined(logs: &[JvmLog]) -> ArchiveVerdict {
    if let Some(r) = logs.iter().find_map(|l| match &l.archive {
        ArchiveVerdict::Rejected(r) => Some(r.clone()),
        _ => None,
    }) {
        return ArchiveVerdict::Rejected(r);
    }
    if logs.iter().any(|l| l.archive == ArchiveVerdict::Mapped) {
        return ArchiveVerdict::Mapped;
    }
    ArchiveVerdict::NotMentioned
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBSERVED_17: &str = "\
[0.010s][info][class,path] bootstrap loader class path=/opt/java/lib/modules
[0.035s][info][gc,init   ] Version: 17.0.15+6-Debian-1deb12u1 (release)
[0.035s][info][gc,init   ] CPUs: 2 total, 2 available
[0.036s][info][gc,init   ] Compressed Oops: Enabled (Zero based)
";

    const MAPPED_17: &str = "\
[0.035s][info][gc,init   ] Version: 17.0.15+6-Debian-1deb12u1 (release)
[0.012s][info][cds       ] trying to map /.kite/java/archive/app.jsa
[0.012s][info][cds       ] Opened archive /.kite/java/archive/app.jsa.
[0.052s][info][cds       ] Mapped dynamic region #0 at base 0x00007f54afbc7000 top 0x00007f54afd24000 (ReadWrite)
[0.057s][info][class,path] checking shared classpath entry: hello.jar
[0.057s][info][class,path] ok
";

    const STALE_JAR_17: &str = "\
[0.012s][info][cds       ] Opened archive /.kite/java/archive/app.jsa.
[0.113s][info][cds       ] Mapped dynamic region #0 at base 0x00007f5ff3bc7000 top 0x00007f5ff3d24000 (ReadWrite)
[0.120s][info][class,path] checking shared classpath entry: /tmp/hello.jar
[0.120s][info][cds       ] UseSharedSpaces: A jar file is not the one used while building the shared archive file: /tmp/hello.jar
[0.120s][warning][cds,dynamic] Unable to use shared archive. The top archive failed to load: /.kite/java/archive/app.jsa
";

    const MAPPED_25: &str = "\
[0.009s][info][aot       ] trying to map /.kite/java/archive/app.aot
[0.009s][info][aot       ] Opened AOT cache /.kite/java/archive/app.aot.
[0.046s][info][gc,init   ] Version: 25.0.2+10-LTS (release)
[0.046s][info][gc,init   ] Compressed Oops: Enabled (Zero based)
[0.023s][info][aot       ] Using AOT-linked classes: true (static archive: has aot-linked classes)
";

    const NO_COOPS_25: &str = "\
[0.022s][info][aot       ] Opened AOT cache /.kite/java/archive/app.aot.
[0.022s][info][aot       ] The AOT cache was created with UseCompressedOops = 1, UseCompressedClassPointers = 1, UseCompactObjectHeaders = 0
[0.022s][warning][aot       ] Unable to use AOT cache.
[                           ] The saved state of UseCompressedOops and UseCompressedClassPointers is different from runtime, CDS will be disabled.
[0.022s][error  ][aot       ] An error has occurred while processing the AOT cache. Run with -Xlog:aot for details.
";

    const DUMP_FAILED_17: &str = "\
[2.072s][error][cds] Error: non-empty directory 'classes'
";

    #[test]
    fn version_and_pointers_come_from_gc_init() {
        let log = parse(OBSERVED_17, None);
        assert_eq!(log.version.as_deref(), Some("17.0.15+6-Debian-1deb12u1"));
        assert_eq!(log.feature, Some(17));
        assert_eq!(log.compressed_oops, Some(true));
        assert_eq!(log.archive, ArchiveVerdict::NotMentioned);
        assert_eq!(parse(MAPPED_25, None).feature, Some(25));
        assert_eq!(feature_release("1.8.0_392"), Some(8));
        assert_eq!(feature_release("21-ea"), Some(21));
    }

    #[test]
    fn mapped_only_when_this_archive_opened_and_kept() {
        let a17 = Some("/.kite/java/archive/app.jsa");
        let a25 = Some("/.kite/java/archive/app.aot");
        assert_eq!(parse(MAPPED_17, a17).archive, ArchiveVerdict::Mapped);
        assert_eq!(parse(MAPPED_25, a25).archive, ArchiveVerdict::Mapped);
        // Another file opened is not ours.
        assert_eq!(
            parse(MAPPED_17, Some("/other.jsa")).archive,
            ArchiveVerdict::NotMentioned
        );
        let ArchiveVerdict::Rejected(why) = parse(STALE_JAR_17, a17).archive else {
            panic!("a stale jar is a rejection");
        };
        assert!(why.contains("not the one used"), "{why}");
        let ArchiveVerdict::Rejected(why) = parse(NO_COOPS_25, a25).archive else {
            panic!("other compressed pointers are a rejection");
        };
        assert!(
            why.contains("Unable to use AOT cache") && why.contains("UseCompressedOops"),
            "the continuation line is part of the reason: {why}"
        );
        let failed = parse(DUMP_FAILED_17, None);
        assert_eq!(failed.errors, vec!["Error: non-empty directory 'classes'"]);
    }

    #[test]
    fn any_rejection_wins_over_mappings() {
        let a = Some("/.kite/java/archive/app.jsa");
        let logs = vec![parse(MAPPED_17, a), parse(STALE_JAR_17, a)];
        assert!(matches!(combined(&logs), ArchiveVerdict::Rejected(_)));
        assert_eq!(combined(&logs[..1]), ArchiveVerdict::Mapped);
        assert_eq!(combined(&[]), ArchiveVerdict::NotMentioned);
    }

    #[test]
    fn logs_are_read_by_prefix_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jvm-1.log"), MAPPED_17).unwrap();
        std::fs::write(dir.path().join("other.txt"), STALE_JAR_17).unwrap();
        let logs = read_dir(dir.path(), "jvm-", Some("/.kite/java/archive/app.jsa"));
        assert_eq!(logs.len(), 1);
        assert_eq!(combined(&logs), ArchiveVerdict::Mapped);
        assert!(read_dir(&dir.path().join("none"), "jvm-", None).is_empty());
    }
}
