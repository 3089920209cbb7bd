//! Writes the seed corpora (`seeds/<target>/`) from kite's own encoders, so they are what kite
//! and containerd really produce: eStargz blobs made by the converter, protobuf messages of the
//! agent protocol, a default OCI spec, the example manifests, a CSR and a certificate.
//!     cargo run --manifest-path fuzz/Cargo.toml --example seeds -- fuzz/seeds

use std::path::{Path, PathBuf};

use kite_protocol::agent as proto;
use protobuf::Message;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("seed directory");
    std::fs::write(d.join(name), bytes).expect("seed file");
}

/// `kind` first (the targets dispatch on it), then `bytes`.
fn tagged(kind: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(bytes);
    v
}

fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        if let Some(l) = link {
            h.set_link_name(l).expect("link name");
        }
        b.append_data(&mut h, name, data).expect("tar entry");
    };
    add("bin/", tar::EntryType::Directory, b"", None);
    add("bin/sh", tar::EntryType::Regular, &[0x7f; 300], None);
    add("bin/ls", tar::EntryType::Symlink, b"", Some("sh"));
    add("bin/cat", tar::EntryType::Link, b"", Some("bin/sh"));
    add("etc/hostname", tar::EntryType::Regular, b"kite\n", None);
    add("etc/.wh.passwd", tar::EntryType::Regular, b"", None);
    b.into_inner().expect("tar")
}

fn estargz(dir: &Path) {
    let tar = layer_tar();
    write(dir, "estargz_convert", "layer", &tagged(1, &tar));
    write(dir, "estargz_convert", "empty", &tagged(4, &[0; 1024]));
    let mut blob = Vec::new();
    kite_estargz::writer::convert(&tar[..], &mut blob, 64, &["bin/sh".to_string()])
        .expect("convert the seed layer");
    write(dir, "estargz_toc", "blob", &blob);
    let footer = &blob[blob.len() - kite_estargz::FOOTER_SIZE..];
    write(dir, "estargz_footer", "footer", footer);
}

fn registry(dir: &Path) {
    let d = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":600}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":1000,"annotations":{{"containerd.io/snapshot/stargz/toc.digest":"{}"}}}}]}}"#,
        d(1),
        d(2),
        d(3)
    );
    write(
        dir,
        "registry_manifest",
        "manifest",
        &tagged(0, manifest.as_bytes()),
    );
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":500,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":500,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        d(4),
        d(5)
    );
    write(
        dir,
        "registry_manifest",
        "index",
        &tagged(1, index.as_bytes()),
    );
    for (name, header) in [
        (
            "bearer",
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        ),
        ("basic", r#"Basic realm="Registry Realm""#),
        (
            "bare",
            "Bearer realm=https://r.example/t, service=r.example",
        ),
    ] {
        write(dir, "registry_challenge", name, header.as_bytes());
    }
    for (name, r) in [
        ("short", "busybox"),
        ("tagged", "127.0.0.1:5000/kite/busybox:latest"),
        ("digest", &format!("docker.io/library/alpine@{}", d(6))),
        ("both", &format!("ghcr.io/a/b/c:v1@{}", d(7))),
    ] {
        write(dir, "image_reference", name, r.as_bytes());
    }
}

fn answers(dir: &Path) {
    let put = |name: &str, kind: u8, m: &dyn protobuf::MessageDyn| {
        let bytes = m.write_to_bytes_dyn().expect("encode");
        write(dir, "guest_answers", name, &tagged(kind, &bytes));
    };
    put(
        "create",
        0,
        &proto::CreateContainerResponse {
            pid: 85,
            ..Default::default()
        },
    );
    put(
        "start",
        1,
        &proto::StartResponse {
            pid: 85,
            ..Default::default()
        },
    );
    put(
        "exec",
        2,
        &proto::ExecProcessResponse {
            pid: 90,
            ..Default::default()
        },
    );
    put(
        "wait",
        3,
        &proto::WaitResponse {
            exit_status: 137,
            exited_at_ns: 1_796_534_884_537_000_000,
            ..Default::default()
        },
    );
    put(
        "pids",
        4,
        &proto::PidsResponse {
            pids: vec![1, 85, 90],
            ..Default::default()
        },
    );
    put(
        "stats",
        5,
        &proto::StatsResponse {
            cpu_usage_usec: 1000,
            memory_usage_bytes: 1 << 20,
            memory_limit_bytes: 256 << 20,
            pids_current: 3,
            pids_limit: 100,
            ..Default::default()
        },
    );
    put(
        "oom",
        6,
        &proto::OomEvent {
            container_id: "c1".into(),
            ..Default::default()
        },
    );
    put(
        "read",
        7,
        &proto::ReadStreamResponse {
            data: b"ready\n".to_vec(),
            ..Default::default()
        },
    );
    put(
        "ping",
        8,
        &proto::PingResponse {
            kernel_release: "6.1.0-57-cloud-amd64".into(),
            agent_version: "0.1.0".into(),
            agent_started_ns: 800_000_000,
            agent_ready_ns: 900_000_000,
            ..Default::default()
        },
    );
}

fn requests(dir: &Path) {
    let spec = serde_json::to_vec(&oci_spec::runtime::Spec::default()).expect("spec JSON");
    let create = proto::CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec: spec.clone(),
        rootfs: "c1/rootfs".into(),
        stdin: true,
        ..Default::default()
    };
    let put = |name: &str, kind: u8, bytes: &[u8]| {
        write(dir, "agent_requests", name, &tagged(kind, bytes));
    };
    put("create", 0, &create.write_to_bytes().expect("encode"));
    put("spec", 1, &spec);
    let process = r#"{"terminal":false,"user":{"uid":0,"gid":0},"args":["sh","-c","ps"],"env":["PATH=/bin"],"cwd":"/"}"#;
    let exec = proto::ExecProcessRequest {
        container_id: "c1".into(),
        exec_id: "e1".into(),
        process: process.as_bytes().to_vec(),
        ..Default::default()
    };
    put("exec", 2, &exec.write_to_bytes().expect("encode"));
    put("process", 3, process.as_bytes());
    let mut net = proto::NetworkConfig::new();
    let mut i = proto::Interface::new();
    i.name = "eth0".into();
    i.mac = "02:42:0a:58:00:05".into();
    i.current_mac = "02:00:00:00:00:01".into();
    i.mtu = 1500;
    let mut a = proto::IpAddress::new();
    a.address = "10.88.0.5".into();
    a.prefix_len = 16;
    i.addresses.push(a);
    let mut a6 = proto::IpAddress::new();
    a6.address = "fd00::5".into();
    a6.prefix_len = 64;
    i.addresses.push(a6);
    net.interfaces.push(i);
    for (dest, gw) in [("", "10.88.0.1"), ("10.88.0.0/16", ""), ("::/0", "fd00::1")] {
        let mut r = proto::Route::new();
        r.device = "eth0".into();
        r.destination = dest.into();
        r.gateway = gw.into();
        net.routes.push(r);
    }
    let mut n = proto::Neighbour::new();
    n.device = "eth0".into();
    n.address = "10.88.0.1".into();
    n.mac = "02:42:0a:58:00:01".into();
    net.neighbours.push(n);
    put("network", 4, &net.write_to_bytes().expect("encode"));
    let remove = proto::ContainerRequest {
        container_id: "c1".into(),
        ..Default::default()
    };
    put("remove", 5, &remove.write_to_bytes().expect("encode"));
}

fn texts(dir: &Path, repo: &Path) {
    let copy = |target: &str, name: &str, path: PathBuf| {
        let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        write(dir, target, name, &text);
    };
    copy("kite_toml", "deploy", repo.join("deploy/kite.toml"));
    write(
        dir,
        "kite_toml",
        "classes",
        b"[shim]\ndefault_vcpus = 2\n[shim.pool]\nenabled = true\ncount = 1\n[[shim.pool.classes]]\nvcpus = 2\nmemory_mib = 512\ncount = 1\n[agent]\nstart_order = \"kubelet\"\n",
    );
    copy(
        "pod_manifest",
        "web-pod",
        repo.join("deploy/examples/web-pod.yaml"),
    );
    copy(
        "pod_manifest",
        "java-pod",
        repo.join("deploy/examples/java-pod.yaml"),
    );
    copy(
        "deployment_manifest",
        "web-app",
        repo.join("deploy/examples/web-app.yaml"),
    );
    let token = kite_coordinator::token::BootstrapToken::generate();
    write(
        dir,
        "join_token",
        "token",
        &tagged(0, token.to_string().as_bytes()),
    );
    let (_key, csr) = kite_agent::link::new_csr("node-1").expect("a CSR");
    write(dir, "join_token", "csr", &tagged(1, csr.as_bytes()));
    let ca = kite_coordinator::pki::ClusterCa::create("seeds").expect("a CA");
    let cert = ca
        .issue(&kite_coordinator::pki::Identity::Node("node-1".into()), 1)
        .expect("a certificate");
    let der = pem_body(&cert.cert_pem);
    write(dir, "join_token", "cert", &tagged(2, &der));
}

/// The DER inside a one-certificate PEM.
fn pem_body(pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("a PEM certificate");
    pem.contents
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/seeds".into()),
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    estargz(&dir);
    registry(&dir);
    answers(&dir);
    requests(&dir);
    texts(&dir, &repo);
    println!("seeds written to {}", dir.display());
}
