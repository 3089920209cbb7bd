//! `kite-pool`: keeps `[shim.pool]`'s VMs booted and ready in the pool directory.
//!
//! Each VM is booted exactly as a pod's would be (the VM layer's one code path), with
//! [`Lifetime::Pooled`]: its QEMU and virtiofsd outlive the holder, and QEMU listens on the
//! agent socket for the pod that adopts it. Its one NIC is a tap in the pool's holding network
//! namespace. The holder publishes a VM once its agent answered ([`pool::publish`]), and from
//! then on any pod's shim may take it; the holder only notices that it is gone.
//!
//! The holder refills one VM at a time (a boot takes a core for seconds under TCG), waits
//! `refill_delay_ms` after a pod took a VM (the pod's start needs the CPU more), stays within the
//! memory budget and the host's available memory, and backs off after a failed boot. It
//! retires VMs whose processes died, that are older than `max_age_secs`, or that no class of
//! the current configuration fits (a changed configuration or guest drains the old VMs).
//!
//! Stopping the holder (SIGTERM) leaves the ready VMs in the pool: pods keep adopting them, and
//! the next holder takes them over. `kite-pool drain` (or the holder with the pool turned off)
//! releases them all.

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Seek};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kite_protocol::agent::Empty;
use kite_vmm::net::{self, AttachedNic, Attachment, NetnsError};
use kite_vmm::pool::{self, PoolEntry, PoolMeta};
use kite_vmm::{Lifetime, PreparedVm, RunningVm, VmError, VmSize};
use tracing::{info, warn};

use super::metrics::{class_label, reason_label, PoolMetrics};
use super::{fingerprint, MISSES_FILE, NETNS_FILE};
use crate::config::ShimConfig;

/// How often the holder looks at the pool.
const TICK: Duration = Duration::from_millis(200);
/// The wait before a VM whose retirement failed is tried again (not every tick, nor never).
const RETIRE_RETRY: Duration = Duration::from_secs(30);
/// The wait after a failed boot, doubled up to the maximum while boots keep failing.
const BACKOFF_MIN: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often the holder checks that its classes' fingerprints still hold (a rebuilt guest, an
/// upgraded QEMU: the VMs made from the old files are replaced).
const FINGERPRINT_CHECK: Duration = Duration::from_secs(2);
/// The misses file is emptied past this size.
const MISSES_MAX_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool {dir}: {op}")]
    Fs {
        dir: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pool {dir}: another kite-pool holds it (stop it first)")]
    Held { dir: PathBuf },
    #[error("pool: holding network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: NetnsError,
    },
    #[error("pooled VM {vm}: open its tap")]
    Tap {
        vm: String,
        #[source]
        source: NetnsError,
    },
    #[error("pooled VM {vm}: publish it in {dir}")]
    Publish {
        vm: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pooled VM {vm}: the agent's WarmUp: {message}")]
    WarmUp { vm: String, message: String },
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The first class short of VMs (`ready` counts each one's) whose next VM fits the memory budget
/// with `held_mib` already held: a large class the budget cannot take now does not keep the
/// smaller ones after it empty.
fn class_to_fill<'a>(
    classes: &'a [Class],
    ready: &[u32],
    held_mib: u64,
    budget_mib: u64,
) -> Option<&'a Class> {
    classes
        .iter()
        .zip(ready)
        .filter(|(c, n)| **n < c.count)
        .map(|(c, _)| c)
        .find(|c| held_mib + c.size.memory_mib <= budget_mib)
}

/// One size of pooled VM, as the holder keeps it.
#[derive(Clone, Debug)]
struct Class {
    size: VmSize,
    count: u32,
    fingerprint: String,
}

impl Class {
    fn label(&self) -> Vec<(String, String)> {
        class_label(self.size.vcpus, self.size.memory_mib)
    }

    fn fits(&self, meta: &PoolMeta) -> bool {
        meta.size == self.size && meta.fingerprint == self.fingerprint
    }
}

/// A VM that finished booting into the pool.
struct Booted {
    name: String,
    meta: PoolMeta,
    took: Duration,
    /// What became of its warm-up: `warmed`, `unsupported` (a guest without `WarmUp`, offered
    /// as it is) or `off` (`warm_up = false`).
    warm_up: &'static str,
}

fn result_label(result: &str) -> Vec<(String, String)> {
    vec![("result".into(), result.into())]
}

/// Runs the guest's warm-up on a VM booted into the pool (see the `WarmUp` RPC): one throwaway
/// container through the start path, so the first pod's container set-up finds that code warm.
/// A guest without the call is offered unwarmed; one whose warm-up fails is not offered.
async fn warm_up(vm: &RunningVm) -> Result<&'static str, PoolError> {
    let ctx = kite_protocol::rpc_context(Some(kite_protocol::WARM_UP_TIMEOUT));
    match vm.agent().warm_up(ctx, &Empty::default()).await {
        Ok(took) => {
            info!(
                vm = vm.id(),
                create_ms = took.create_ms,
                start_ms = took.start_ms,
                run_ms = took.run_ms,
                "pooled VM warmed up"
            );
            Ok("warmed")
        }
        Err(e) => {
            let e = kite_protocol::errors::RpcError::from(e);
            if e.code() == ttrpc::Code::UNIMPLEMENTED {
                info!(vm = vm.id(), "the guest has no warm-up: offered as it is");
                return Ok("unsupported");
            }
            Err(PoolError::WarmUp {
                vm: vm.id().to_string(),
                message: kite_protocol::errors::error_chain(&e),
            })
        }
    }
}

type BootFuture = Pin<Box<dyn Future<Output = Result<Booted, PoolError>> + Send>>;

pub struct Holder {
    config: ShimConfig,
    pool_dir: PathBuf,
    netns: PathBuf,
    classes: Vec<Class>,
    metrics: Arc<PoolMetrics>,
    /// VMs whose retirement failed (they stay in the pool): when, and why they were retired.
    retire_failed: std::sync::Mutex<HashMap<String, (Instant, &'static str)>>,
}

/// The configuration's classes with their current fingerprints.
fn classes_of(config: &ShimConfig) -> Vec<Class> {
    config
        .pool_classes()
        .into_iter()
        .map(|c| {
            let size = VmSize {
                vcpus: c.vcpus,
                memory_mib: c.memory_mib,
            };
            Class {
                size,
                count: c.count,
                fingerprint: fingerprint(config, size),
            }
        })
        .collect()
}

impl Holder {
    pub fn new(config: ShimConfig, metrics: Arc<PoolMetrics>) -> Holder {
        let pool_dir = config.pool_dir();
        let classes = classes_of(&config);
        Holder {
            netns: pool_dir.join(NETNS_FILE),
            pool_dir,
            classes,
            config,
            metrics,
            retire_failed: Default::default(),
        }
    }

    pub fn pool_dir(&self) -> &Path {
        &self.pool_dir
    }

    /// Makes the pool directory and takes the holder's lock (one holder per pool).
    fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, PoolError> {
        let fs = |op| {
            let dir = self.pool_dir.clone();
            move |source| PoolError::Fs { dir, op, source }
        };
        // Only root's shims adopt from it: nobody else has business reading VMs' sockets.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.pool_dir)
            .map_err(fs("create"))?;
        std::fs::set_permissions(&self.pool_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(fs("restrict to root"))?;
        // A claim renames a VM's directory into state_dir, which rename(2) does only within one
        // mount (EXDEV across two, even two of one filesystem, which st_dev cannot tell): a
        // directory is moved there and back once now, so a pool that no claim could take from
        // is refused at start rather than missed by every pod.
        let probe = self.pool_dir.join(format!(".probe-{}", std::process::id()));
        let moved = self
            .config
            .state_dir
            .join(format!(".pool-probe-{}", std::process::id()));
        std::fs::create_dir_all(&self.config.state_dir).map_err(fs("create state_dir for"))?;
        let _ = std::fs::remove_dir(&probe);
        std::fs::create_dir(&probe).map_err(fs("create a probe in"))?;
        let renamed = std::fs::rename(&probe, &moved);
        let _ = std::fs::remove_dir(&probe);
        let _ = std::fs::remove_dir(&moved);
        renamed.map_err(|source| PoolError::Fs {
            dir: self.pool_dir.clone(),
            op: "move a directory to state_dir from (it must be on state_dir's mount)",
            source,
        })?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.pool_dir.join(".holder.lock"))
            .map_err(fs("open the holder's lock"))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
            PoolError::Held {
                dir: self.pool_dir.clone(),
            }
        })
    }

    /// Keeps the pool filled until `stop` resolves; the ready VMs stay in the pool then.
    /// With the pool turned off it releases the pool instead and returns.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<(), PoolError> {
        if !self.config.pool.enabled {
            let released = self.drain()?;
            info!(pool = %self.pool_dir.display(), released, "the pool is off ([shim.pool] enabled = false): released it");
            return Ok(());
        }
        let _lock = self.lock()?;
        net::ensure_holding_netns(&self.netns).map_err(|source| PoolError::Netns {
            path: self.netns.clone(),
            source,
        })?;
        let mut offered = self.take_over().await;
        for class in &self.classes {
            self.metrics
                .target
                .get_or_create(&class.label())
                .set(i64::from(class.count));
        }
        info!(
            pool = %self.pool_dir.display(),
            ready = offered.len(),
            classes = ?self.classes.iter().map(|c| (c.size.vcpus, c.size.memory_mib, c.count)).collect::<Vec<_>>(),
            "keeping the pool"
        );
        let mut misses_read = std::fs::metadata(self.pool_dir.join(MISSES_FILE))
            .map(|m| m.len())
            .unwrap_or(0);
        let mut boot: Option<BootFuture> = None;
        let mut last_claim: Option<Instant> = None;
        let mut backoff: Option<(Instant, Duration)> = None;
        let mut fingerprints_checked = Instant::now();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                done = async { boot.as_mut().expect("polled only while booting").await }, if boot.is_some() => {
                    boot = None;
                    self.metrics.booting.set(0);
                    match done {
                        Ok(b) => {
                            info!(vm = %b.name, boot_ms = b.took.as_millis() as u64, warm_up = b.warm_up, "pooled VM ready");
                            self.metrics.boots.get_or_create(&result_label("ready")).inc();
                            self.metrics.warm_ups.get_or_create(&result_label(b.warm_up)).inc();
                            self.metrics.boot_seconds.observe(b.took.as_secs_f64());
                            offered.insert(b.name, b.meta);
                            backoff = None;
                        }
                        Err(e) => {
                            warn!(error = %kite_protocol::errors::error_chain(&e), "boot a pooled VM");
                            self.metrics.boots.get_or_create(&result_label("failed")).inc();
                            if matches!(e, PoolError::WarmUp { .. }) {
                                self.metrics.warm_ups.get_or_create(&result_label("failed")).inc();
                            }
                            let wait = backoff.map_or(BACKOFF_MIN, |(_, w)| (w * 2).min(BACKOFF_MAX));
                            backoff = Some((Instant::now(), wait));
                        }
                    }
                }
                _ = tokio::time::sleep(TICK) => {}
            }
            self.notice_claims(&mut offered, &mut last_claim);
            if fingerprints_checked.elapsed() >= FINGERPRINT_CHECK {
                fingerprints_checked = Instant::now();
                let current = classes_of(&self.config);
                if current
                    .iter()
                    .map(|c| &c.fingerprint)
                    .ne(self.classes.iter().map(|c| &c.fingerprint))
                {
                    info!("the guest or QEMU changed: replacing the pooled VMs made from the old ones");
                    self.classes = current;
                    if boot.take().is_some() {
                        self.metrics.booting.set(0);
                    }
                }
            }
            self.retire_unfit(&mut offered).await;
            self.retry_retirements(&offered).await;
            self.count_misses(&mut misses_read);
            let ready = self.ready_by_class(&offered);
            for (class, n) in self.classes.iter().zip(&ready) {
                self.metrics
                    .ready
                    .get_or_create(&class.label())
                    .set(i64::from(*n));
            }
            let refill_wait = Duration::from_millis(self.config.pool.refill_delay_ms);
            let may_boot = boot.is_none()
                && backoff.is_none_or(|(at, wait)| at.elapsed() >= wait)
                && last_claim.is_none_or(|at| at.elapsed() >= refill_wait);
            if may_boot {
                if let Some(class) = self.next_to_boot(&offered, &ready) {
                    self.metrics.booting.set(1);
                    boot = Some(Box::pin(boot_one(
                        self.config.clone(),
                        self.pool_dir.clone(),
                        self.netns.clone(),
                        class,
                    )));
                }
            }
        }
        // A VM still booting is released as its boot is dropped; the ready ones stay.
        drop(boot);
        info!(pool = %self.pool_dir.display(), ready = offered.len(), "stopped; the ready VMs stay for pods and the next kite-pool");
        Ok(())
    }

    /// At start: keeps the ready VMs a previous holder left that fit the configuration and
    /// still run; retires the rest (those it was booting, the unfit, the dead).
    async fn take_over(&self) -> HashMap<String, PoolMeta> {
        pool::sweep_retired(&self.pool_dir);
        let mut kept = HashMap::new();
        for entry in pool::entries(&self.pool_dir) {
            let reason = match &entry.meta {
                None => Some("unfinished"),
                Some(m) if !self.classes.iter().any(|c| c.fits(m)) => Some("config"),
                Some(_) if !kite_vmm::processes_alive(&entry.dir) => Some("dead"),
                Some(m) => {
                    kept.insert(entry.name.clone(), m.clone());
                    None
                }
            };
            if let Some(reason) = reason {
                self.retire(entry, reason).await;
            }
        }
        kept
    }

    /// VMs that left the pool without the holder: pods took them.
    fn notice_claims(
        &self,
        offered: &mut HashMap<String, PoolMeta>,
        last_claim: &mut Option<Instant>,
    ) {
        let taken: Vec<String> = offered
            .keys()
            .filter(|name| !self.pool_dir.join(name).exists())
            .cloned()
            .collect();
        for name in taken {
            if let Some(meta) = offered.remove(&name) {
                info!(vm = %name, idle_s = meta.age().as_secs(), "a pod took a pooled VM");
                self.metrics.claims.inc();
                self.metrics.idle_seconds.observe(meta.age().as_secs_f64());
                *last_claim = Some(Instant::now());
            }
        }
    }

    /// Retires the offered VMs whose processes died, that are too old, or that no class fits
    /// any more.
    async fn retire_unfit(&self, offered: &mut HashMap<String, PoolMeta>) {
        let max_age = Duration::from_secs(self.config.pool.max_age_secs);
        let waiting = self.retries_waiting();
        let unfit: Vec<(String, &'static str)> = offered
            .iter()
            .filter(|(name, _)| !waiting.contains(*name))
            .filter_map(|(name, meta)| {
                if !self.classes.iter().any(|c| c.fits(meta)) {
                    Some((name.clone(), "config"))
                } else if !kite_vmm::processes_alive(&self.pool_dir.join(name)) {
                    Some((name.clone(), "dead"))
                } else if !max_age.is_zero() && meta.age() > max_age {
                    Some((name.clone(), "age"))
                } else {
                    None
                }
            })
            .collect();
        for (name, reason) in unfit {
            if let Some(meta) = offered.remove(&name) {
                let entry = PoolEntry {
                    dir: self.pool_dir.join(&name),
                    name: name.clone(),
                    meta: Some(meta.clone()),
                };
                if !self.retire(entry, reason).await {
                    offered.insert(name, meta);
                }
            }
        }
    }

    /// Whether the VM is out of the pool now (retired, or claimed by a pod first); false when
    /// the retirement failed and it is still there.
    async fn retire(&self, entry: PoolEntry, reason: &'static str) -> bool {
        let pool_dir = self.pool_dir.clone();
        let name = entry.name.clone();
        let dir = entry.dir.clone();
        let outcome = tokio::task::spawn_blocking(move || pool::retire(&pool_dir, &entry)).await;
        let retired = !matches!(outcome, Ok(Err(_)) | Err(_));
        {
            let mut failed = self.retire_failed.lock().expect("retire_failed lock");
            if retired {
                failed.remove(&name);
            } else if failed
                .insert(name.clone(), (Instant::now(), reason))
                .is_some()
            {
                // Said once already; tried again every RETIRE_RETRY.
                return false;
            }
        }
        match outcome {
            Ok(Ok(true)) => {
                info!(vm = %name, reason, "pooled VM retired");
                self.metrics
                    .retired
                    .get_or_create(&reason_label(reason))
                    .inc();
                true
            }
            Ok(Ok(false)) => true,
            Ok(Err(e)) => {
                warn!(vm = %name, dir = %dir.display(), reason, error = %e, "cannot retire a pooled VM; it stays in the pool");
                false
            }
            Err(e) => {
                warn!(vm = %name, reason, error = %e, "retiring a pooled VM panicked");
                false
            }
        }
    }

    /// The VMs whose retirement failed less than [`RETIRE_RETRY`] ago.
    fn retries_waiting(&self) -> std::collections::HashSet<String> {
        self.retire_failed
            .lock()
            .expect("retire_failed lock")
            .iter()
            .filter(|(_, (at, _))| at.elapsed() < RETIRE_RETRY)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Tries again to retire the VMs that are not offered (those `take_over` could not retire)
    /// whose retirement failed [`RETIRE_RETRY`] ago or more; forgets those gone meanwhile.
    async fn retry_retirements(&self, offered: &HashMap<String, PoolMeta>) {
        let due: Vec<(String, &'static str)> = {
            let mut failed = self.retire_failed.lock().expect("retire_failed lock");
            failed.retain(|name, _| self.pool_dir.join(name).exists());
            failed
                .iter()
                .filter(|(name, (at, _))| {
                    !offered.contains_key(*name) && at.elapsed() >= RETIRE_RETRY
                })
                .map(|(name, (_, reason))| (name.clone(), *reason))
                .collect()
        };
        if due.is_empty() {
            return;
        }
        for entry in pool::entries(&self.pool_dir) {
            if let Some((_, reason)) = due.iter().find(|(name, _)| *name == entry.name) {
                self.retire(entry, reason).await;
            }
        }
    }

    /// Counts the misses shims noted since the last look.
    fn count_misses(&self, read: &mut u64) {
        let path = self.pool_dir.join(MISSES_FILE);
        let Ok(mut file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        else {
            return;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < *read {
            *read = 0;
        }
        if len == *read || file.seek(std::io::SeekFrom::Start(*read)).is_err() {
            return;
        }
        let mut text = String::new();
        if file.read_to_string(&mut text).is_err() {
            return;
        }
        // Only whole lines; a line being written is read next time.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        for reason in text[..whole].lines() {
            self.metrics
                .misses
                .get_or_create(&reason_label(reason))
                .inc();
        }
        *read += whole as u64;
        if *read > MISSES_MAX_BYTES && *read == len {
            let _ = file.set_len(0);
            *read = 0;
        }
    }

    /// The offered VMs of each class; one being retired (unfit, its retirement failed) is not
    /// ready, though its memory still counts.
    fn ready_by_class(&self, offered: &HashMap<String, PoolMeta>) -> Vec<u32> {
        let failed = self.retire_failed.lock().expect("retire_failed lock");
        self.classes
            .iter()
            .map(|c| {
                let n = offered
                    .iter()
                    .filter(|(name, m)| c.fits(m) && !failed.contains_key(*name))
                    .count();
                u32::try_from(n).unwrap_or(u32::MAX)
            })
            .collect()
    }

    /// The class to boot a VM of next, if any is short and memory allows one more.
    fn next_to_boot(&self, offered: &HashMap<String, PoolMeta>, ready: &[u32]) -> Option<Class> {
        let held: u64 = offered.values().map(|m| m.size.memory_mib).sum();
        let class = class_to_fill(
            &self.classes,
            ready,
            held,
            self.config.pool.memory_budget_mib,
        )?
        .clone();
        let available_mib = available_memory_mib();
        if available_mib.is_some_and(|a| a < self.config.pool.min_available_mib) {
            return None;
        }
        Some(class)
    }

    /// Releases every VM in the pool, and the holding namespace (`kite-pool drain`; the pool
    /// turned off). Refused while a holder runs. Returns how many VMs it released.
    pub fn drain(&self) -> Result<usize, PoolError> {
        if !self.pool_dir.exists() {
            return Ok(0);
        }
        let _lock = self.lock()?;
        pool::sweep_retired(&self.pool_dir);
        let mut released = 0;
        // Every VM it can release goes; the first failure is reported at the end.
        let mut failed = None;
        for entry in pool::entries(&self.pool_dir) {
            match pool::retire(&self.pool_dir, &entry) {
                Ok(true) => {
                    released += 1;
                    self.metrics
                        .retired
                        .get_or_create(&reason_label("drain"))
                        .inc();
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(vm = %entry.name, error = %e, "cannot release a pooled VM");
                    failed.get_or_insert(PoolError::Fs {
                        dir: entry.dir.clone(),
                        op: "retire a VM",
                        source: e,
                    });
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        net::remove_holding_netns(&self.netns);
        if !self.config.pool.cgroup.is_empty() {
            kite_vmm::cgroup::remove_path(&self.config.pool.cgroup);
        }
        let _ = std::fs::remove_file(self.pool_dir.join(MISSES_FILE));
        Ok(released)
    }
}

/// The host's available memory (MiB), when /proc says.
fn available_memory_mib() -> Option<u64> {
    use procfs::Current;
    let info = procfs::Meminfo::current().ok()?;
    info.mem_available.map(|b| b >> 20)
}

/// Boots one VM of `class` into the pool: its directory, virtiofsd, a tap in the holding
/// namespace, QEMU (outliving the holder), the agent's answer; then offers it.
async fn boot_one(
    config: ShimConfig,
    pool_dir: PathBuf,
    netns: PathBuf,
    class: Class,
) -> Result<Booted, PoolError> {
    let started = Instant::now();
    let name = pool::random_name();
    let dir = pool_dir.join(&name);
    let vm_id = format!("pool-{name}");
    let prepared = PreparedVm::prepare(&config.vm_config(), &vm_id, &dir, Lifetime::Pooled).await?;
    let tap = format!("kite-p{name}");
    let mac = pool::random_mac();
    let fd = {
        let (netns, tap) = (netns.clone(), tap.clone());
        tokio::task::spawn_blocking(move || net::open_pool_tap(&netns, &tap))
            .await
            .expect("the tap thread does not panic")
    }
    .map_err(|source| PoolError::Tap {
        vm: vm_id.clone(),
        source,
    })?;
    let nics = vec![AttachedNic {
        name: "eth0".into(),
        mac: mac.clone(),
        device_mac: None,
        attachment: Attachment::Tap { tap: tap.clone() },
    }];
    // The pool's cgroup from the start: what the VM touches while it boots and waits is charged
    // there (and stays there after a pod adopts it: charges do not move between cgroups).
    let pool_cgroup = Some(config.pool.cgroup.as_str()).filter(|c| !c.is_empty());
    let vm = prepared
        .start(class.size, nics, vec![fd], pool_cgroup)
        .await?;
    // A failed warm-up drops `vm`: its guard releases it.
    let warm_up = match config.pool.warm_up {
        true => warm_up(&vm).await?,
        false => "off",
    };
    let dir = vm.into_pool();
    let meta = PoolMeta {
        fingerprint: class.fingerprint,
        size: class.size,
        tap,
        mac,
        ready_unix_ms: pool::unix_ms(),
    };
    if let Err(source) = pool::publish(&dir, &meta) {
        kite_vmm::cleanup_vm_dir(&dir);
        return Err(PoolError::Publish {
            vm: vm_id,
            dir,
            source,
        });
    }
    Ok(Booted {
        name,
        meta,
        took: started.elapsed(),
        warm_up,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(memory_mib: u64, count: u32) -> Class {
        Class {
            size: VmSize {
                vcpus: 1,
                memory_mib,
            },
            count,
            fingerprint: "fp".into(),
        }
    }

    #[test]
    fn a_pool_claims_could_not_move_out_of_is_refused_at_start() {
        let state = tempfile::tempdir().unwrap();
        let mut config = ShimConfig {
            state_dir: state.path().join("sandboxes"),
            ..ShimConfig::default()
        };
        config.pool.dir = state.path().join("sandboxes/.pool");
        let holder = Holder::new(config.clone(), Arc::new(PoolMetrics::new()));
        drop(holder.lock().expect("a pool in state_dir"));
        assert_eq!(
            std::fs::read_dir(&config.state_dir).unwrap().count(),
            1,
            "probe left"
        );
        // /dev/shm is a mount of its own: a claim's rename(2) from it would fail (EXDEV).
        let elsewhere = tempfile::tempdir_in("/dev/shm").unwrap();
        config.pool.dir = elsewhere.path().join("pool");
        let holder = Holder::new(config, Arc::new(PoolMetrics::new()));
        let err = holder.lock().expect_err("a pool on another mount");
        assert!(err.to_string().contains("state_dir"), "{err}");
    }

    #[tokio::test]
    async fn a_failed_retirement_is_said_once_and_tried_again_later() {
        let root = tempfile::tempdir().unwrap();
        let mut config = ShimConfig::default();
        config.pool.dir = root.path().join("pool");
        let holder = Holder::new(config, Arc::new(PoolMetrics::new()));
        let dir = root.path().join("pool/0000abcd");
        std::fs::create_dir_all(&dir).unwrap();
        // Where it would be moved is taken: the rename fails, the VM stays.
        std::fs::create_dir_all(root.path().join("pool/.retired-0000abcd/x")).unwrap();
        let entry = || PoolEntry {
            dir: dir.clone(),
            name: "0000abcd".into(),
            meta: None,
        };
        assert!(!holder.retire(entry(), "unfinished").await);
        assert!(!holder.retire(entry(), "unfinished").await);
        assert!(dir.exists());
        assert!(holder.retries_waiting().contains("0000abcd"));
        std::fs::remove_dir_all(root.path().join("pool/.retired-0000abcd")).unwrap();
        assert!(holder.retire(entry(), "unfinished").await);
        assert!(!dir.exists());
        assert!(holder.retries_waiting().is_empty());
    }

    #[test]
    fn the_first_short_class_the_budget_allows_is_filled() {
        let classes = [class(1024, 1), class(256, 2)];
        let mib = |c: Option<&Class>| c.map(|c| c.size.memory_mib);
        // Both short, room for either: the first.
        assert_eq!(mib(class_to_fill(&classes, &[0, 0], 0, 2048)), Some(1024));
        // The large one does not fit: the small one is still filled.
        assert_eq!(mib(class_to_fill(&classes, &[0, 0], 1024, 1536)), Some(256));
        // Full classes are skipped; nothing fits: none.
        assert_eq!(mib(class_to_fill(&classes, &[1, 0], 0, 2048)), Some(256));
        assert_eq!(mib(class_to_fill(&classes, &[1, 2], 0, 2048)), None);
        assert_eq!(mib(class_to_fill(&classes, &[0, 0], 1900, 2048)), None);
    }
}
