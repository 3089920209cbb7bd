//! A container start's stages, as a structured record: one JSON line per start in
//! `timings_file` (`[shim]`), which the demo and the benchmarks read, and a log line for
//! people. The file is bounded: past 1 MiB it is moved to `<file>.1` (the previous one goes).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{info, warn};

use crate::sandbox::BootTiming;

/// When the file is rotated.
const MAX_BYTES: u64 = 1 << 20;

/// What one container's create and start took.
#[derive(Clone, Debug)]
pub struct StartTimings {
    pub container: String,
    pub sandbox: String,
    /// When the shim received Create (the benchmarks measure containerd's and the shim's
    /// start-up up to here).
    pub create_received: SystemTime,
    /// The sandbox's boot, if this create booted it.
    pub boot: Option<BootTiming>,
    /// Create's time in the shim; a boot this create did is in `boot`, not here.
    pub create: Duration,
    /// Of `create`, what the guest agent took.
    pub guest_create: Duration,
    pub start: Duration,
    pub guest_start: Duration,
}

impl Default for StartTimings {
    fn default() -> Self {
        StartTimings {
            container: String::new(),
            sandbox: String::new(),
            create_received: SystemTime::UNIX_EPOCH,
            boot: None,
            create: Duration::ZERO,
            guest_create: Duration::ZERO,
            start: Duration::ZERO,
            guest_start: Duration::ZERO,
        }
    }
}

/// The record's line (milliseconds, fractional).
#[derive(Debug, Serialize, PartialEq)]
pub struct TimingsRecord {
    pub container: String,
    pub sandbox: String,
    pub create_received_unix_ms: f64,
    pub booted: bool,
    pub virtiofsd_ms: f64,
    pub vm_boot_ms: f64,
    pub guest_kernel_ms: f64,
    pub guest_agent_ms: f64,
    pub network_attach_ms: f64,
    pub network_guest_ms: f64,
    pub create_ms: f64,
    pub guest_create_ms: f64,
    pub start_ms: f64,
    pub guest_start_ms: f64,
    /// Create and start less what the guest agent took.
    pub shim_own_ms: f64,
    /// What the warm pool did for the sandbox's start: off, hit, miss:<reason> ("" when this
    /// create booted nothing).
    pub pool: String,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl StartTimings {
    pub fn record(&self) -> TimingsRecord {
        let b = self.boot.unwrap_or_default();
        TimingsRecord {
            container: self.container.clone(),
            sandbox: self.sandbox.clone(),
            create_received_unix_ms: ms(self
                .create_received
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()),
            booted: self.boot.is_some(),
            virtiofsd_ms: ms(b.vm.virtiofsd),
            vm_boot_ms: ms(b.vm.vm_to_agent),
            guest_kernel_ms: ms(b.vm.guest_kernel),
            guest_agent_ms: ms(b.vm.guest_agent),
            network_attach_ms: ms(b.network_attach),
            network_guest_ms: ms(b.network_guest),
            create_ms: ms(self.create),
            guest_create_ms: ms(self.guest_create),
            start_ms: ms(self.start),
            guest_start_ms: ms(self.guest_start),
            shim_own_ms: ms(
                (self.create + self.start).saturating_sub(self.guest_create + self.guest_start)
            ),
            pool: self.boot.map(|b| b.pool.to_string()).unwrap_or_default(),
        }
    }
}

/// Where start records go (`None`: only the log).
pub struct TimingsLog {
    file: Option<PathBuf>,
}

impl TimingsLog {
    pub fn new(file: PathBuf) -> Self {
        TimingsLog {
            file: (!file.as_os_str().is_empty()).then_some(file),
        }
    }

    pub fn record(&self, timings: &StartTimings) {
        let record = timings.record();
        info!(
            container = %record.container,
            booted = record.booted,
            pool = %record.pool,
            vm_boot_ms = record.vm_boot_ms,
            create_ms = record.create_ms,
            start_ms = record.start_ms,
            "container started"
        );
        let Some(path) = &self.file else { return };
        let mut line = serde_json::to_vec(&record).expect("a timings record serializes");
        line.push(b'\n');
        if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_BYTES) {
            let mut old = path.as_os_str().to_owned();
            old.push(".1");
            let _ = std::fs::rename(path, PathBuf::from(old));
        }
        // One write of one line with O_APPEND: shims that record at once do not interleave.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(&line));
        if let Err(e) = written {
            warn!(path = %path.display(), error = %e, "write the start timings");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_is_one_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timings.jsonl");
        let log = TimingsLog::new(path.clone());
        let t = StartTimings {
            container: "c1".into(),
            sandbox: "c1".into(),
            create: Duration::from_millis(30),
            guest_create: Duration::from_millis(10),
            start: Duration::from_millis(5),
            guest_start: Duration::from_millis(4),
            ..StartTimings::default()
        };
        log.record(&t);
        log.record(&t);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["container"], "c1");
        assert_eq!(lines[0]["booted"], false);
        assert!((lines[0]["shim_own_ms"].as_f64().unwrap() - 21.0).abs() < 0.01);
    }

    #[test]
    fn an_empty_path_records_nothing() {
        let log = TimingsLog::new(PathBuf::new());
        assert!(log.file.is_none());
        log.record(&StartTimings::default());
    }
}
