#!/usr/bin/env python3
"""Scenario benchmark: N containers with runc and with kite in one run.

    hack/bench-containers.py [N]        (default 10; needs hack/setup.sh first)

For each runtime it times `ctr run --rm IMAGE ID echo ready` to the first output and to the
end, and for kite reads the shim's per-stage timings (its structured record, one JSON line per
container start in /run/kite/timings.jsonl, `timings_file` in [shim]). Then it
starts one idle container per runtime and reads the resident memory of the shim, QEMU and
virtiofsd. Prints medians with the spread (min, p90, max) and names the accelerator.
"""
import json, os, re, statistics, subprocess, sys, time

last_wall_start = 0.0

IMAGE = "127.0.0.1:5000/kite/busybox:latest"
TIMINGS = "/run/kite/timings.jsonl"
RUNTIMES = {"runc": "io.containerd.runc.v2", "kite": "io.containerd.kite.v2"}


def accel():
    flags = open("/proc/cpuinfo").read()
    return "KVM" if re.search(r"\b(vmx|svm)\b", flags) else "TCG"


def timed_run(runtime, cid):
    global last_wall_start
    last_wall_start = time.time()
    start = time.monotonic()
    p = subprocess.Popen(["ctr", "run", "--rm", "--runtime", runtime, IMAGE, cid, "echo", "ready"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    t_first = time.monotonic() - start
    p.wait()
    t_end = time.monotonic() - start
    if p.returncode != 0 or first.strip() != b"ready":
        sys.exit(f"{cid}: ctr run failed: {p.stderr.read().decode()}")
    return t_first * 1000, t_end * 1000


def timings(cid, wall_start):
    """The shim's record of `cid`'s start, plus shim_start_ms: from `ctr run` to the shim
    receiving containerd's Create (containerd's work, `shim start`, the shim's own start-up)."""
    for path in (TIMINGS, TIMINGS + ".1"):
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            record = json.loads(line)
            if record.get("container") == cid:
                found = {k: float(v) for k, v in record.items() if k.endswith("_ms")}
                found["shim_start_ms"] = record["create_received_unix_ms"] - wall_start * 1000
                return found
    return {}


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def procs_matching(pattern):
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if re.search(pattern, cmd):
            out.append(int(pid))
    return out


def spread(values):
    v = sorted(values)
    p90 = v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))]
    return f"median {statistics.median(v):8.1f}  min {v[0]:8.1f}  p90 {p90:8.1f}  max {v[-1]:8.1f}"


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    subprocess.run(["ctr", "images", "pull", "--plain-http", IMAGE], check=True, stdout=subprocess.DEVNULL)
    tag = os.getpid()
    results = {r: {"first": [], "end": []} for r in RUNTIMES}
    stages = {}
    for i in range(n):
        for name, runtime in RUNTIMES.items():  # interleaved, so both see the same machine state
            cid = f"bench-{name}-{tag}-{i}"
            first, end = timed_run(runtime, cid)
            results[name]["first"].append(first)
            results[name]["end"].append(end)
            if name == "kite":
                for k, v in timings(cid, last_wall_start).items():
                    stages.setdefault(k, []).append(v)
    print(f"containers: {n} per runtime, accelerator {accel()}, {os.cpu_count()} cores (ms)")
    for name in RUNTIMES:
        print(f"  {name:5} ctr run to first output  {spread(results[name]['first'])}")
        print(f"  {name:5} ctr run to exit          {spread(results[name]['end'])}")
    ratio = statistics.median(results["kite"]["first"]) / statistics.median(results["runc"]["first"])
    print(f"  kite/runc time to first output: {ratio:.1f}x")
    print("kite stages (ms):")
    for k in ["shim_start_ms", "virtiofsd_ms", "vm_boot_ms", "guest_kernel_ms", "guest_agent_ms", "create_ms",
              "guest_create_ms", "start_ms", "guest_start_ms", "shim_own_ms"]:
        if k in stages:
            print(f"  {k[:-3]:16} {spread(stages[k])}")

    # Memory of one idle container per runtime.
    print("resident memory of an idle container (MiB):")
    for name, runtime in RUNTIMES.items():
        cid = f"bench-idle-{name}-{tag}"
        subprocess.run(["ctr", "run", "-d", "--runtime", runtime, IMAGE, cid, "sleep", "600"], check=True)
        time.sleep(2)
        if name == "kite":
            groups = {"shim": rf"containerd-shim-kite-v2 .*-id {cid} ",
                      "qemu": rf"qemu-system.*kite-{cid} ",
                      "virtiofsd": rf"virtiofsd .*sandboxes/{cid}/"}
        else:
            groups = {"shim": rf"containerd-shim-runc-v2 .*-id {cid} "}
        for g, pat in groups.items():
            kib = sum(rss_kib(p) for p in procs_matching(pat))
            print(f"  {name:5} {g:10} {kib / 1024:7.1f}")
        subprocess.run(["ctr", "task", "kill", "-s", "SIGKILL", cid], stderr=subprocess.DEVNULL)
        for _ in range(100):
            st = subprocess.run(["ctr", "task", "ls"], capture_output=True, text=True).stdout
            if not re.search(rf"^{cid}\s+\d+\s+RUNNING", st, re.M):
                break
            time.sleep(0.1)
        subprocess.run(["ctr", "task", "delete", cid], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        subprocess.run(["ctr", "container", "delete", cid], stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
