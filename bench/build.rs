//! Compiles shopkv's client protos (from the repository's `proto/`) with protox,
//! so the bench needs no system `protoc` for its own driver.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "../proto/shopkv/v1/kv.proto",
        "../proto/shopkv/v1/cluster.proto",
        "../proto/shopkv/v1/commerce.proto",
        "../proto/shopkv/v1/session.proto",
        "../proto/shopkv/v1/lock.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["../proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
