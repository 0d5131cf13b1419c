//! Compiles the .proto files with protox (a pure-Rust protobuf compiler), so a
//! fresh machine needs no system `protoc`.

const PROTOS: &[&str] = &[
    "istio/security/v1alpha1/ca.proto",
    "envoy/service/secret/v3/sds.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "spiffe/workload/workload.proto",
    "citadel/v1/trust_bundle.proto",
    "citadel/v1/policy.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Small per-call buffers: see src/codec.rs.
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
