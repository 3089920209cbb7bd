//! The life of PID 1: boot, then serve the agent protocol until the VM is powered off.

use std::io::Write;
use std::time::Duration;

use kite_protocol::agent::PingResponse;
use tracing::{error, info, warn};

use crate::boot;
use crate::channel;
use crate::reaper::Reaper;
use crate::service::AgentService;

/// ttrpc serves on listening sockets; a virtio-serial port is a single stream. The agent
/// serves on this unix socket and pumps the port's bytes to one connection to it.
const INTERNAL_SOCKET: &str = "/run/kite/agent.sock";

/// Pumps the agent port's bytes to and from one connection to the internal socket, on two
/// threads with blocking I/O, for the VM's life. A blocking virtio-serial port behaves as the
/// agent needs while the host is not connected (a pooled VM between the pool's holder and its
/// pod, a restarting shim): reads return end-of-file (read again after a pause) and writes
/// wait for the host to come back. tokio's readiness is not used here: it takes the port's
/// hang-up while the host is away as final, and would then spin on the port after the host
/// reconnects.
fn pump_serial_port(path: std::path::PathBuf, garbage: bool) {
    loop {
        if let Err(e) = pump_once(&path, garbage) {
            error!("agent channel {}: {e}; reopening", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One pumping session: returns when either side fails, after both have stopped (each side
/// that stops makes the other stop: a session never hangs half-open).
/// `garbage` (a misbehaving test build only): random bytes follow the agent's first answer.
fn pump_once(path: &std::path::Path, garbage: bool) -> std::io::Result<()> {
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    let conn = std::os::unix::net::UnixStream::connect(INTERNAL_SOCKET)?;
    let (mut port_in, mut port_out) = (port.try_clone()?, port);
    let (mut conn_in, mut conn_out) = (conn.try_clone()?, conn.try_clone()?);
    // Written once the agent side has ended: wakes the reader out of its wait for the host.
    let (wake_rx, wake_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let host_to_agent = std::thread::Builder::new()
        .name("agent-port-in".into())
        .spawn(move || -> std::io::Result<()> {
            let mut buf = vec![0u8; 64 << 10];
            let mut was_connected = false;
            let result = loop {
                let mut fds = [
                    nix::poll::PollFd::new(port_in.as_fd(), nix::poll::PollFlags::POLLIN),
                    nix::poll::PollFd::new(wake_rx.as_fd(), nix::poll::PollFlags::POLLIN),
                ];
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => break Err(e.into()),
                }
                if fds[1].any().unwrap_or(false) {
                    break Ok(());
                }
                match port_in.read(&mut buf) {
                    // The host is not connected: wait for it. A host that leaves after it was
                    // connected is a warm pool's holder (or a restarting shim): the VM idles,
                    // so its memory is compacted for free page reporting to give back.
                    Ok(0) => {
                        if std::mem::take(&mut was_connected) {
                            crate::boot::compact_memory();
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(n) => {
                        was_connected = true;
                        if let Err(e) = conn_out.write_all(&buf[..n]) {
                            break Err(e);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            // The other side stops reading the connection now.
            let _ = conn_out.shutdown(std::net::Shutdown::Both);
            result
        })?;
    let mut buf = vec![0u8; 64 << 10];
    let agent_to_host: std::io::Result<()> = loop {
        match conn_in.read(&mut buf) {
            Ok(0) => {
                break Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the agent's connection closed",
                ))
            }
            Ok(n) => {
                if let Err(e) = port_out.write_all(&buf[..n]) {
                    break Err(e);
                }
                #[cfg(feature = "misbehave")]
                if garbage {
                    if let Err(e) = port_out.write_all(&crate::misbehave::garbage(256 << 10)) {
                        break Err(e);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let _ = garbage;
    // The reader stops at its next wait (or at its next write to the connection).
    let _ = nix::unistd::write(&wake_tx, &[1]);
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let host_side = host_to_agent
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the port reader panicked")));
    host_side.and(agent_to_host)
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
    // The agent's log goes to the kernel's console (the host's console.log). A virtio-serial
    // port of its own would cost the guest 4 MiB: the driver fills each port's receive queue
    // with a page per descriptor, 1024 descriptors on virtio-mmio.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
    match boot_and_serve(started_ns) {
        Ok(()) => info!("agent stopped"),
        Err(e) => error!("kite-guest: {e:#}"),
    }
    power_off();
}

fn boot_and_serve(started_ns: u64) -> anyhow::Result<()> {
    use anyhow::Context;
    let ms = |from: u64| (boot::monotonic_ns().saturating_sub(from)) as f64 / 1e6;
    boot::mount_kernel_filesystems()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let t_modules = boot::monotonic_ns();
    let loaded = boot::load_modules(&cmdline)?;
    boot::report_free_memory_finely();
    let modules_ms = ms(t_modules);
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

    #[cfg(feature = "misbehave")]
    let garbage = crate::misbehave::garbage_after_first_answer(&cmdline);
    #[cfg(not(feature = "misbehave"))]
    let garbage = false;
    // Forked while the agent has one thread; without it, runtime helpers are executed.
    let zygote = match crate::zygote::Zygote::spawn() {
        Ok(z) => Some(z),
        Err(e) => {
            warn!("{e}; the runtime helpers will be executed");
            None
        }
    };
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
        let service = AgentService::new(reaper, info, zygote);
        #[cfg(feature = "misbehave")]
        let services = match crate::misbehave::mode(&cmdline) {
            Some(mode) => kite_protocol::agent_ttrpc::create_agent(
                crate::misbehave::MisbehavingAgent::new(service, mode),
            ),
            None => kite_protocol::agent_ttrpc::create_agent(service),
        };
        #[cfg(not(feature = "misbehave"))]
        let services = kite_protocol::agent_ttrpc::create_agent(service);
        let mut server = ttrpc::r#async::Server::new();
        server = match agent_port {
            Some(path) => {
                let _ = std::fs::remove_file(INTERNAL_SOCKET);
                let server = server
                    .bind(&format!("unix://{INTERNAL_SOCKET}"))
                    .context("listen on the internal agent socket")?;
                std::thread::Builder::new()
                    .name("agent-port".into())
                    .spawn(move || pump_serial_port(path, garbage))
                    .context("start the agent port's pump")?;
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
