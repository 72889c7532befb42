// Builds the gRPC code from `protos/` with a vendored protoc, so a fresh machine needs no system one.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts run single-threaded, so setting the variable cannot race; it is how prost-build
    // is told which protoc to run.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().bytes(".").compile_protos(
        &[
            "protos/store.proto",
            "protos/auth.proto",
            "protos/presence.proto",
        ],
        &["protos"],
    )?;
    println!("cargo:rerun-if-changed=protos");
    Ok(())
}
