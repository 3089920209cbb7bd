//! The shim's reading of the guest agent's answers. The guest is not trusted: a container runs
//! as root in it, so its kernel and agent may say anything. Every answer is checked here before
//! the shim acts on it (pids in range, lists and chunks bounded, ids well-formed, times sane);
//! an impossible one is an error of that pod's call, never a panic or an unbounded allocation.
//! Pure functions, driven by the fuzz target `guest_answers` (`fuzz/`).

use std::time::{Duration, SystemTime};

use kite_protocol::agent as proto;

use super::guest::{ContainerStats, Exit, GuestError};

/// Linux's largest pid (`PID_MAX_LIMIT` on 64-bit).
pub const PID_MAX: u32 = 4 * 1024 * 1024;
/// The most pids a `ListPids` answer may name (a guest has far fewer processes).
pub const MAX_PIDS: usize = 1 << 16;
/// The largest exit status a process can have: 255, or 128 + the highest signal (64).
pub const MAX_EXIT_STATUS: u32 = 255;

fn bad(what: String) -> GuestError {
    GuestError::BadAnswer(what)
}

/// A pid the guest gave for `what`.
pub fn pid(what: &str, pid: u32) -> Result<u32, GuestError> {
    if pid == 0 || pid > PID_MAX {
        return Err(bad(format!("{what}: pid {pid}")));
    }
    Ok(pid)
}

/// A process's exit: an impossible status reads as 255, a time in the future or before the
/// VM could exist as now (the guest's clock is its own).
pub fn exit(answer: &proto::WaitResponse, now: SystemTime) -> Exit {
    let status = if answer.exit_status > MAX_EXIT_STATUS {
        MAX_EXIT_STATUS
    } else {
        answer.exit_status
    };
    let now_ns = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos();
    let now_ns = u64::try_from(now_ns).unwrap_or(u64::MAX);
    // 2020-01-01: no kite VM exited before.
    const EARLIEST_NS: u64 = 1_577_836_800 * 1_000_000_000;
    let at_ns = if (EARLIEST_NS..=now_ns).contains(&answer.exited_at_ns) {
        answer.exited_at_ns
    } else {
        now_ns
    };
    Exit { status, at_ns }
}

/// The pids of `container_id`.
pub fn pids(container_id: &str, answer: proto::PidsResponse) -> Result<Vec<u32>, GuestError> {
    if answer.pids.len() > MAX_PIDS {
        return Err(bad(format!(
            "container {container_id}: {} pids, over {MAX_PIDS}",
            answer.pids.len()
        )));
    }
    for &p in &answer.pids {
        pid(&format!("container {container_id}"), p)?;
    }
    Ok(answer.pids)
}

/// Resource use as the guest counts it: taken as it is (it only feeds metrics; a usage may
/// well be above a limit just lowered).
pub fn stats(answer: &proto::StatsResponse) -> ContainerStats {
    ContainerStats {
        cpu_usage_usec: answer.cpu_usage_usec,
        cpu_user_usec: answer.cpu_user_usec,
        cpu_system_usec: answer.cpu_system_usec,
        memory_usage_bytes: answer.memory_usage_bytes,
        memory_limit_bytes: answer.memory_limit_bytes,
        pids_current: answer.pids_current,
        pids_limit: answer.pids_limit,
    }
}

/// The container an OOM event names: a containerd identifier (it goes into an event); `None`
/// for an answer without an event (the agent is shutting down).
pub fn oom_container(answer: proto::OomEvent) -> Result<Option<String>, GuestError> {
    let id = answer.container_id;
    if id.is_empty() {
        return Ok(None);
    }
    if kite_protocol::identifier_problem(&id).is_some() {
        let shown: String = id.chars().take(kite_protocol::MAX_ID_LEN).collect();
        return Err(bad(format!("OOM event for container {shown:?}")));
    }
    Ok(Some(id))
}

/// A chunk of a process's output: at most the `asked` bytes.
pub fn chunk(what: &str, asked: u32, answer: &proto::ReadStreamResponse) -> Result<(), GuestError> {
    if answer.data.len() > asked as usize {
        return Err(bad(format!(
            "{what}: {} bytes of output, {asked} asked for",
            answer.data.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_out_of_range_are_refused() {
        assert_eq!(pid("c1", 1).unwrap(), 1);
        assert_eq!(pid("c1", PID_MAX).unwrap(), PID_MAX);
        for p in [0, PID_MAX + 1, u32::MAX] {
            let e = pid("container c1", p).unwrap_err();
            assert_eq!(e.code(), ttrpc::Code::INTERNAL);
            assert!(e.to_string().contains("container c1"), "{e}");
        }
        let many = proto::PidsResponse {
            pids: vec![1; MAX_PIDS + 1],
            ..Default::default()
        };
        assert!(pids("c1", many).is_err());
    }

    #[test]
    fn exits_are_kept_possible() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let answer = |exit_status, exited_at_ns| proto::WaitResponse {
            exit_status,
            exited_at_ns,
            ..Default::default()
        };
        let e = exit(&answer(137, 1_700_000_000_000_000_000), now);
        assert_eq!((e.status, e.at_ns), (137, 1_700_000_000_000_000_000));
        let e = exit(&answer(70_000, u64::MAX), now);
        assert_eq!((e.status, e.at_ns), (255, 1_800_000_000_000_000_000));
        assert_eq!(exit(&answer(0, 5), now).at_ns, 1_800_000_000_000_000_000);
    }

    #[test]
    fn oversized_or_odd_answers_are_refused() {
        let oom = |id: &str| proto::OomEvent {
            container_id: id.into(),
            ..Default::default()
        };
        assert_eq!(oom_container(oom("c1")).unwrap().as_deref(), Some("c1"));
        assert!(oom_container(oom("../c1")).is_err());
        assert_eq!(oom_container(oom("")).unwrap(), None);
        let data = proto::ReadStreamResponse {
            data: vec![0; 10],
            ..Default::default()
        };
        assert!(chunk("c1 stdout", 10, &data).is_ok());
        assert!(chunk("c1 stdout", 9, &data).is_err());
    }
}
