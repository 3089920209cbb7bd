#!/usr/bin/env python3
"""Builds a small OCI image archive (for `ctr images import`) from Debian's static busybox.

    hack/mkimage.py OUT.tar REF [--cmd 'sh -c ...' | --exec PATH | --argv '["java", ...]']
        [--binary /usr/bin/iperf3 ...] [--env K=V ...]
        [--tree SRC:DST ... [--exclude REL ...]] [--file SRC:DST ...]

The image has /bin/busybox with its applets linked, /etc/passwd and /etc/group (root, nobody),
and /tmp; each --binary is added at its own path with the shared libraries ldd finds for it.
Each --tree (a JDK, say) is a layer of its own, symlinks resolved, with the shared libraries
its ELF files need; its files keep their mtimes (a JDK's default CDS archive checks the
`modules` file's). --exclude drops paths (relative to each tree) from the trees; the --file
copies make one last layer. Reproducible: fixed ordering and mtimes (the busybox layer's are
0), so the digest only changes with its inputs.
"""
import gzip, hashlib, io, json, os, subprocess, sys, tarfile

BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "echo", "cat", "sleep", "uname", "ls", "id", "env", "pwd", "true", "false",
           "wc", "head", "tail", "grep", "sha256sum", "dd", "ps", "kill", "printf", "test",
           "hostname", "stty", "tty", "yes", "seq", "mkdir", "rm", "touch", "wget", "nc",
           "httpd", "ip", "ifconfig", "mount", "df", "free", "top", "date", "tr", "od"]


def add(tar, name, data=None, mode=0o644, kind=tarfile.REGTYPE, link="", mtime=0):
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    info.mode = mode
    info.type = kind
    info.linkname = link
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def with_libraries(binaries):
    """The binaries and every shared library (and the loader) they need, by path."""
    paths = set()
    for b in binaries:
        paths.add(b)
        out = subprocess.run(["ldd", b], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) > parts.index("=>") + 1:
                paths.add(parts[parts.index("=>") + 1])
            elif parts and parts[0].startswith("/"):
                paths.add(parts[0])
    return sorted(p for p in paths if p.startswith("/"))


def is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def compressed(tar_bytes, level=6):
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=level) as g:
        g.write(tar_bytes)
    return tar_bytes, gz.getvalue()


def add_parents(tar, path, made):
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        if d not in made:
            made.add(d)
            add(tar, d, kind=tarfile.DIRTYPE, mode=0o755)


def tree_layer(src, dst, excludes):
    """A directory tree at dst (symlinks resolved), plus the libraries its ELF files need."""
    raw = io.BytesIO()
    files, elves = [], []
    for root, dirs, names in os.walk(src, followlinks=True):
        rel_root = os.path.relpath(root, src)
        dirs[:] = sorted(d for d in dirs
                         if os.path.normpath(os.path.join(rel_root, d)) not in excludes)
        for n in sorted(names):
            rel = os.path.normpath(os.path.join(rel_root, n))
            full = os.path.join(root, n)
            if rel in excludes or not os.path.exists(full):
                continue
            files.append((rel, full))
            if is_elf(full):
                elves.append(full)
    made = set()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_parents(tar, dst.strip("/") + "/x", made)
        for rel, full in files:
            name = os.path.join(dst.strip("/"), rel)
            add_parents(tar, name, made)
            st = os.stat(full)
            with open(full, "rb") as f:
                add(tar, name, f.read(), mode=st.st_mode & 0o777, mtime=int(st.st_mtime))
        for lib in with_libraries(elves):
            if lib.startswith(src):
                continue
            add_parents(tar, lib, made)
            with open(os.path.realpath(lib), "rb") as f:
                add(tar, lib.strip("/"), f.read(), mode=0o755)
    return compressed(raw.getvalue())


def files_layer(pairs):
    raw = io.BytesIO()
    made = set()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for src, dst in pairs:
            add_parents(tar, dst, made)
            st = os.stat(src)
            with open(src, "rb") as f:
                add(tar, dst.strip("/"), f.read(), mode=st.st_mode & 0o777, mtime=int(st.st_mtime))
    return compressed(raw.getvalue())


def layer(binaries=()):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev", "home", "var", "run"]:
            add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        with open(BUSYBOX, "rb") as f:
            add(tar, "bin/busybox", f.read(), mode=0o755)
        for a in APPLETS:
            add(tar, f"bin/{a}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        add(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/sh\n")
        add(tar, "etc/group", b"root:x:0:\nnobody:x:65534:\n")
        add(tar, "etc/hostname", b"kite\n")
        made = set()
        for path in with_libraries(binaries):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in made and d not in ("bin", "etc", "tmp"):
                    made.add(d)
                    add(tar, d, kind=tarfile.DIRTYPE, mode=0o755)
            with open(os.path.realpath(path), "rb") as f:
                add(tar, path.strip("/"), f.read(), mode=0o755)
    return compressed(raw.getvalue(), 9)


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def main():
    out, ref = sys.argv[1], sys.argv[2]
    cmd = ["sh"]
    if "--cmd" in sys.argv:
        cmd = ["sh", "-c", sys.argv[sys.argv.index("--cmd") + 1]]
    if "--exec" in sys.argv:
        cmd = [sys.argv[sys.argv.index("--exec") + 1]]
    if "--argv" in sys.argv:
        cmd = json.loads(sys.argv[sys.argv.index("--argv") + 1])
    opts = lambda name: [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == name]
    env = {"PATH": "/bin"}
    for kv in opts("--env"):
        k, v = kv.split("=", 1)
        env[k] = v
    layers = [layer(opts("--binary"))]
    excludes = {os.path.normpath(e) for e in opts("--exclude")}
    for t in opts("--tree"):
        src, dst = t.split(":", 1)
        layers.append(tree_layer(os.path.realpath(src), dst, excludes))
    if opts("--file"):
        layers.append(files_layer([f.split(":", 1) for f in opts("--file")]))
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": [f"{k}={v}" for k, v in sorted(env.items())], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [digest(t) for t, _ in layers]},
        "history": [{"created_by": "kite hack/mkimage.py"}],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(gz), "size": len(gz)} for _, gz in layers],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": ref,
                                       "io.containerd.image.name": ref},
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }, sort_keys=True).encode()
    with tarfile.open(out, "w") as tar:
        add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add(tar, "index.json", index)
        for blob in [config, manifest] + [gz for _, gz in layers]:
            add(tar, "blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
    print(digest(manifest))


if __name__ == "__main__":
    main()
