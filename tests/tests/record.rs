//! `kite-snapshotter convert --record`: the image's command runs once (namespaces of its own,
//! an unpacked copy of the image), the files it opens are recorded with fanotify, and the
//! converted layer has them first, in the order they were opened, before the prefetch
//! landmark. Against the real registry.

use std::process::Command;

use kite_e2e::{require_setup, IMAGE};
use kite_estargz::writer::read_toc;
use kite_estargz::{Index, Node};
use kite_snapshotter::registry::{ImageRef, RegistryClient, RegistryOptions};

const RECORDED: &str = "127.0.0.1:5000/kite/busybox-rec:e2e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_start_up_files_come_first() {
    tokio::task::spawn_blocking(require_setup).await.unwrap();
    let out = Command::new("/usr/local/bin/kite-snapshotter")
        .args(["convert", "--record", "--record-command"])
        .arg(r#"["sh", "-c", "cat /etc/passwd > /dev/null; cat /etc/group > /dev/null"]"#)
        .args([IMAGE, RECORDED])
        .output()
        .expect("run kite-snapshotter convert --record");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "convert --record: {said}");
    assert!(said.contains("recorded"), "{said}");

    let client = RegistryClient::new(RegistryOptions::default()).unwrap();
    let image = ImageRef::parse(RECORDED).unwrap();
    let resolved = client.resolve(&image).await.unwrap();
    let blob = client
        .blob(&image, &resolved.manifest.layers[0].digest)
        .await
        .unwrap();
    let (toc, _, toc_offset) = read_toc(&blob, 64 << 20).unwrap();
    let index = Index::from_toc(&toc, toc_offset).unwrap();
    // busybox (sh and cat are busybox) first, then the two files, in the order opened;
    // nothing else the command did not open.
    assert_eq!(index.prefetch.len(), 3, "{:?}", index.prefetch);
    assert_eq!(index.prefetch[1..], ["etc/passwd", "etc/group"]);
    let Node::File { size, .. } = &index.inodes[&index.prefetch[0]].node else {
        panic!("{} is not a file", index.prefetch[0]);
    };
    assert!(
        *size > 500_000,
        "the first recorded file is busybox ({size} bytes)"
    );

    // A command that does not exist fails the recording's run, not the tool: nothing is
    // recorded and the conversion still succeeds, saying so.
    let out = Command::new("/usr/local/bin/kite-snapshotter")
        .args([
            "convert",
            "--record",
            "--record-command",
            "/no/such/program",
        ])
        .args([IMAGE, RECORDED])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("recorded 0 files"), "{said}");
}
