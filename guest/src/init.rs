//! The life of PID 1: boot, then serve the agent protocol until the VM is powered off.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kite_protocol::agent::PingResponse;
use tracing::{error, info, warn};

use crate::boot;
use crate::channel::{self, FdStream};
use crate::reaper::Reaper;
use crate::service::AgentService;

/// Name of the virtio-serial port that carries the agent's log lines to the host.
pub const LOG_PORT_NAME: &str = "kite.log";

/// Log lines go to the log port once it exists, and to the kernel console before that.
#[derive(Clone)]
struct LogSink(Arc<Mutex<Option<std::fs::File>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock().ok().as_mut().and_then(|f| f.as_mut()) {
            Some(port) => port.write(buf),
            None => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// ttrpc serves on listening sockets; a virtio-serial port is a single stream. The agent
/// serves on this unix socket and pumps the port's bytes to one connection to it.
const INTERNAL_SOCKET: &str = "/run/kite/agent.sock";

async fn pump_serial_port(path: std::path::PathBuf) {
    loop {
        let pumped = async {
            let mut port = FdStream::open_serial_port(&path)?;
            let mut conn = tokio::net::UnixStream::connect(INTERNAL_SOCKET).await?;
            tokio::io::copy_bidirectional(&mut port, &mut conn).await
        }
        .await;
        error!("agent channel {}: {pumped:?}; reopening", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops the VM: nothing runs after PID 1.
fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

pub fn run() -> ! {
    if let Err(e) = boot::leave_initramfs() {
        eprintln!("kite-guest: {}", kite_protocol::errors::error_chain(&e));
        power_off();
    }
    let started_ns = boot::monotonic_ns();
    let sink = LogSink(Arc::new(Mutex::new(None)));
    let writer = sink.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_target(false)
        .init();
    match boot_and_serve(started_ns, sink) {
        Ok(()) => info!("agent stopped"),
        Err(e) => error!("kite-guest: {e:#}"),
    }
    power_off();
}

fn boot_and_serve(started_ns: u64, sink: LogSink) -> anyhow::Result<()> {
    use anyhow::Context;
    let ms = |from: u64| (boot::monotonic_ns().saturating_sub(from)) as f64 / 1e6;
    boot::mount_kernel_filesystems()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let t_modules = boot::monotonic_ns();
    let loaded = boot::load_modules(&cmdline)?;
    let modules_ms = ms(t_modules);
    if let Ok(port) = channel::wait_for_port(LOG_PORT_NAME, Duration::from_millis(500)) {
        if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&port) {
            *sink.0.lock().expect("log sink lock") = Some(file);
        }
    }
    let t_share = boot::monotonic_ns();
    boot::mount_share(
        kite_protocol::SHARE_TAG,
        kite_protocol::GUEST_SHARE_DIR,
        Duration::from_secs(5),
    )?;
    let use_vsock = cmdline
        .split_whitespace()
        .any(|w| w == "kite.channel=vsock");
    let agent_port = if use_vsock {
        None
    } else {
        Some(channel::wait_for_port(
            kite_protocol::SERIAL_PORT_NAME,
            Duration::from_secs(5),
        )?)
    };
    let per_module: Vec<String> = loaded.iter().map(|(m, t)| format!("{m}:{t:.0}")).collect();
    info!(
        modules = %per_module.join(","),
        modules_ms,
        share_and_port_ms = ms(t_share),
        since_pid1_ms = ms(started_ns),
        "booted"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        let reaper = Reaper::start().context("reaper")?;
        // A pod's containers share the guest's network, and localhost with it.
        if let Err(e) = crate::network::loopback_up().await {
            warn!("loopback: {e}");
        }
        let info = PingResponse {
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            agent_started_ns: started_ns,
            agent_ready_ns: boot::monotonic_ns(),
            ..Default::default()
        };
        let service = AgentService::new(reaper, info);
        let services = kite_protocol::agent_ttrpc::create_agent(service);
        let mut server = ttrpc::r#async::Server::new();
        server = match agent_port {
            Some(path) => {
                let _ = std::fs::remove_file(INTERNAL_SOCKET);
                let server = server
                    .bind(&format!("unix://{INTERNAL_SOCKET}"))
                    .context("listen on the internal agent socket")?;
                tokio::spawn(pump_serial_port(path));
                server
            }
            None => server
                .bind(&format!(
                    "vsock://{}:{}",
                    u32::MAX,
                    kite_protocol::VSOCK_PORT
                ))
                .context("listen on vsock")?,
        };
        server = server.register_service(services);
        server.start().await.context("serve the agent protocol")?;
        info!("serving");
        futures::future::pending::<()>().await;
        Ok::<(), anyhow::Error>(())
    })
}
