//! Debug for the CSI messages that carry secrets or caller-controlled maps (`secrets`,
//! `volume_context`, `parameters`, `publish_context`): only the listed fields are printed, the
//! rest is elided. build.rs turns derived Debug off for exactly these types, so a `{:?}` of a
//! request can never print the pod's service-account token.

use std::fmt;

use crate::proto::csi::v1 as csi;

macro_rules! redacted_debug {
    ($($ty:ty { $($field:ident),* }),* $(,)?) => {
        $(
            impl fmt::Debug for $ty {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.debug_struct(stringify!($ty))
                        $(.field(stringify!($field), &self.$field))*
                        .finish_non_exhaustive()
                }
            }
        )*
    };
}

redacted_debug! {
    csi::CreateVolumeRequest { name, capacity_range },
    csi::DeleteVolumeRequest { volume_id },
    csi::ControllerPublishVolumeRequest { volume_id, node_id, readonly },
    csi::ControllerPublishVolumeResponse {},
    csi::ControllerUnpublishVolumeRequest { volume_id, node_id },
    csi::ValidateVolumeCapabilitiesRequest { volume_id, volume_capabilities },
    csi::validate_volume_capabilities_response::Confirmed { volume_capabilities },
    csi::GetCapacityRequest { volume_capabilities, accessible_topology },
    csi::CreateSnapshotRequest { source_volume_id, name },
    csi::DeleteSnapshotRequest { snapshot_id },
    csi::ListSnapshotsRequest { max_entries, starting_token, source_volume_id, snapshot_id },
    csi::GetSnapshotRequest { snapshot_id },
    csi::ControllerExpandVolumeRequest { volume_id, capacity_range },
    csi::ControllerModifyVolumeRequest { volume_id },
    csi::NodeStageVolumeRequest { volume_id, staging_target_path, volume_capability },
    csi::NodePublishVolumeRequest { volume_id, staging_target_path, target_path, volume_capability, readonly },
    csi::NodeExpandVolumeRequest { volume_id, volume_path, capacity_range, staging_target_path },
    csi::Volume { volume_id, capacity_bytes, accessible_topology },
    csi::CreateVolumeGroupSnapshotRequest { name, source_volume_ids },
    csi::DeleteVolumeGroupSnapshotRequest { group_snapshot_id, snapshot_ids },
    csi::GetVolumeGroupSnapshotRequest { group_snapshot_id, snapshot_ids },
    csi::GetMetadataAllocatedRequest { snapshot_id, starting_offset, max_results },
    csi::GetMetadataDeltaRequest { base_snapshot_id, target_snapshot_id, starting_offset, max_results },
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.secret-token-payload.signature";

    #[test]
    fn tokens_and_maps_never_print() {
        let tokens = format!(r#"{{"api://AzureADTokenExchange":{{"token":"{TOKEN}"}}}}"#);
        let publish = csi::NodePublishVolumeRequest {
            volume_id: "sv-1".into(),
            target_path: "/var/lib/kubelet/pods/p/vol".into(),
            secrets: [(
                "csi.storage.k8s.io/serviceAccount.tokens".to_string(),
                tokens.clone(),
            )]
            .into(),
            volume_context: [(
                "csi.storage.k8s.io/serviceAccount.tokens".to_string(),
                tokens.clone(),
            )]
            .into(),
            ..Default::default()
        };
        let stage = csi::NodeStageVolumeRequest {
            volume_id: "sv-1".into(),
            secrets: [("k".to_string(), TOKEN.to_string())].into(),
            volume_context: [("k".to_string(), TOKEN.to_string())].into(),
            publish_context: [("k".to_string(), TOKEN.to_string())].into(),
            ..Default::default()
        };
        let create = csi::CreateVolumeRequest {
            name: "pvc-1".into(),
            secrets: [("k".to_string(), TOKEN.to_string())].into(),
            parameters: [("k".to_string(), TOKEN.to_string())].into(),
            ..Default::default()
        };
        let response = csi::CreateVolumeResponse {
            volume: Some(csi::Volume {
                volume_id: "sv-1".into(),
                volume_context: [("k".to_string(), TOKEN.to_string())].into(),
                ..Default::default()
            }),
        };
        for printed in [
            format!("{publish:?}"),
            format!("{publish:#?}"),
            format!("{stage:?}"),
            format!("{create:?}"),
            format!("{response:?}"),
        ] {
            assert!(
                !printed.contains("secret-token-payload"),
                "leaked: {printed}"
            );
            assert!(
                printed.contains("sv-1") || printed.contains("pvc-1"),
                "{printed}"
            );
        }
    }
}
