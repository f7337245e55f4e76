//! Generates the CSI v1.12.0 gRPC types and services from proto/csi.proto with the vendored
//! protoc, so that a build needs no protoc on the machine.
//!
//! Every message that carries `secrets`, `volume_context`, `parameters` or another
//! caller-controlled map gets no derived Debug: prost's derived Debug would print the pod's
//! service-account token (CVE-2023-2878, CVE-2024-3744 and CVE-2025-7445 were such leaks).
//! src/csi/redact.rs writes redacting impls for exactly this list.

/// Kept in sync with src/csi/redact.rs: a type listed here and not implemented there fails
/// to compile wherever it is formatted with `{:?}`; one implemented there and not listed
/// here conflicts with the derived impl.
const REDACTED_MESSAGES: &[&str] = &[
    ".csi.v1.CreateVolumeRequest",
    ".csi.v1.DeleteVolumeRequest",
    ".csi.v1.ControllerPublishVolumeRequest",
    ".csi.v1.ControllerPublishVolumeResponse",
    ".csi.v1.ControllerUnpublishVolumeRequest",
    ".csi.v1.ValidateVolumeCapabilitiesRequest",
    ".csi.v1.ValidateVolumeCapabilitiesResponse.Confirmed",
    ".csi.v1.GetCapacityRequest",
    ".csi.v1.CreateSnapshotRequest",
    ".csi.v1.DeleteSnapshotRequest",
    ".csi.v1.ListSnapshotsRequest",
    ".csi.v1.GetSnapshotRequest",
    ".csi.v1.ControllerExpandVolumeRequest",
    ".csi.v1.ControllerModifyVolumeRequest",
    ".csi.v1.NodeStageVolumeRequest",
    ".csi.v1.NodePublishVolumeRequest",
    ".csi.v1.NodeExpandVolumeRequest",
    ".csi.v1.Volume",
    ".csi.v1.CreateVolumeGroupSnapshotRequest",
    ".csi.v1.DeleteVolumeGroupSnapshotRequest",
    ".csi.v1.GetVolumeGroupSnapshotRequest",
    ".csi.v1.GetMetadataAllocatedRequest",
    ".csi.v1.GetMetadataDeltaRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    println!("cargo:rerun-if-changed=proto/csi.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .skip_debug(REDACTED_MESSAGES.iter().copied())
        .compile_with_config(
            config,
            &[std::path::PathBuf::from("proto/csi.proto")],
            &[std::path::PathBuf::from("proto"), include],
        )?;
    Ok(())
}
