//! Compiles the contract with `protox` (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["recheck/v1/hook.proto", "recheck/v1/admin.proto", "demo/v1/orders.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["."])?;
    // A method added to a service later (ResendHook/ResendBatch) answers UNIMPLEMENTED in a
    // server that does not implement it, so adding one is additive for Rust servers too.
    tonic_prost_build::configure().generate_default_stubs(true).compile_fds(fds)?;
    Ok(())
}
