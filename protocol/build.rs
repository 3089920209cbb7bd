use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

/// The protocols, each one definition in proto/: shim ↔ guest agent, kite-snapshotter ↔
/// kite-lazyfs, and the prefetch API.
const PROTOS: [&str; 3] = ["agent", "lazyfs", "prefetch"];

fn main() {
    if std::env::var_os("CARGO_FEATURE_NODE_API").is_some() {
        node_api();
    }
    if std::env::var_os("CARGO_FEATURE_CONTAINERD_API").is_some() {
        println!("cargo:rerun-if-changed=proto/containerd_containers.proto");
        tonic_prost_build::configure()
            .build_server(false)
            .compile_protos(&["proto/containerd_containers.proto"], &["proto"])
            .expect("generate containerd's containers API from proto/containerd_containers.proto");
    }
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    let inputs: Vec<String> = PROTOS.iter().map(|p| format!("proto/{p}.proto")).collect();
    for input in &inputs {
        println!("cargo:rerun-if-changed={input}");
    }
    Codegen::new()
        .out_dir(&out)
        .inputs(&inputs)
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generate the protocols from proto/");
    // The generated files carry inner attributes (`#![...]`), which `include!` cannot take;
    // the modules in lib.rs set their own.
    for proto in PROTOS {
        for name in [format!("{proto}.rs"), format!("{proto}_ttrpc.rs")] {
            let path = std::path::Path::new(&out).join(name);
            let text = std::fs::read_to_string(&path).expect("read generated protocol code");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
                .collect();
            std::fs::write(&path, kept.join("\n")).expect("write generated protocol code");
        }
    }
}

/// The node agent's gRPC API (tonic), with serde on its messages: kitectl prints them as JSON or
/// YAML.
fn node_api() {
    println!("cargo:rerun-if-changed=proto/node.proto");
    tonic_prost_build::configure()
        .type_attribute(".kite.node.v1", "#[derive(serde::Serialize)]")
        .type_attribute(".kite.node.v1", "#[serde(rename_all = \"camelCase\")]")
        .compile_protos(&["proto/node.proto"], &["proto"])
        .expect("generate the node API from proto/node.proto");
    println!("cargo:rerun-if-changed=proto/coordinator.proto");
    // Its own directory: it imports node.proto, whose types are the ones generated above
    // (`extern_path`), and what it would generate for that package must not replace them.
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("coordinator");
    std::fs::create_dir_all(&out).expect("create the coordinator API's output directory");
    tonic_prost_build::configure()
        .out_dir(&out)
        .extern_path(".kite.node.v1", "crate::node")
        .type_attribute(".kite.coordinator.v1", "#[derive(serde::Serialize)]")
        .type_attribute(
            ".kite.coordinator.v1",
            "#[serde(rename_all = \"camelCase\")]",
        )
        .compile_protos(&["proto/coordinator.proto"], &["proto"])
        .expect("generate the coordinator API from proto/coordinator.proto");
}
