//! Compiles the protos in `proto/` with protox (pure Rust), so that no system
//! `protoc` is needed on a fresh machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/shopkv/v1/kv.proto",
        "proto/shopkv/v1/cluster.proto",
        "proto/shopkv/v1/peer.proto",
        "proto/shopkv/v1/commerce.proto",
        "proto/shopkv/v1/session.proto",
        "proto/shopkv/v1/lock.proto",
        "proto/shopkv/v1/watch.proto",
        "proto/shopkv/v1/election.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // The encoded descriptors feed gRPC server reflection (grpcurl, grpcui).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("shopkv_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
