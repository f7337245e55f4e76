//! The CSI Controller service. It runs on every node (distributed provisioning) and carves
//! volumes from that node's own pools.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{log_id, parse, run_blocking};
use crate::proto::csi::v1 as csi;
use crate::volume::{
    CreateRequest, Manager, SnapshotSummary, VolumeError, VolumeId, VolumeParams, VolumeSummary,
    volume_context,
};

use csi::controller_service_capability::{Rpc, Type, rpc};

pub(super) struct ControllerService {
    pub(super) manager: Arc<Manager>,
}

fn to_volume(s: &VolumeSummary, node_id: &str) -> csi::Volume {
    csi::Volume {
        capacity_bytes: s.capacity_bytes as i64,
        volume_id: s.id.to_string(),
        volume_context: volume_context(s).into_iter().collect(),
        content_source: None,
        accessible_topology: vec![parse::node_topology(node_id)],
    }
}

fn to_snapshot(s: &SnapshotSummary) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_unix as i64,
            nanos: 0,
        }),
        // The local copy is complete before CreateSnapshot answers; a backup once uploaded.
        ready_to_use: s.ready_to_use,
        group_snapshot_id: String::new(),
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("CreateVolume", String::new(), move || {
            if !req.mutable_parameters.is_empty() {
                return Err(VolumeError::InvalidArgument {
                    field: "mutable_parameters",
                    message: "no mutable parameters are supported".into(),
                });
            }
            parse::capabilities(&req.volume_capabilities, "volume_capabilities")?;
            let create = CreateRequest {
                name: req.name,
                capacity: parse::capacity_range(req.capacity_range.as_ref()),
                params: VolumeParams::from_parameters(&parse::to_btree(&req.parameters))?,
                requisite_nodes: parse::requisite_nodes(req.accessibility_requirements.as_ref()),
                source: parse::content_source(req.volume_content_source.as_ref())?,
            };
            let summary = manager.create_volume(&create)?;
            let mut volume = to_volume(&summary, manager.node_id());
            // Made from a source: the answer names it, as the spec asks.
            volume.content_source = req.volume_content_source;
            Ok(csi::CreateVolumeResponse {
                volume: Some(volume),
            })
        })
        .await
        .map(Response::new)
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("DeleteVolume", log_id(&req.volume_id), move || {
            // An id sealvol never issued names nothing to delete: done, as the spec wants.
            match parse::existing_volume_id(&req.volume_id) {
                Ok(id) => manager.delete_volume(&id)?,
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            Ok(csi::DeleteVolumeResponse {})
        })
        .await
        .map(Response::new)
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking(
            "ValidateVolumeCapabilities",
            log_id(&req.volume_id),
            move || {
                let id = parse::existing_volume_id(&req.volume_id)?;
                if req.volume_capabilities.is_empty() {
                    return Err(VolumeError::InvalidArgument {
                        field: "volume_capabilities",
                        message: "at least one capability is required".into(),
                    });
                }
                manager.validate(&id)?;
                // An unsupported capability is not an error here: the answer is "not confirmed".
                let response =
                    match parse::capabilities(&req.volume_capabilities, "volume_capabilities") {
                        Ok(_) => csi::ValidateVolumeCapabilitiesResponse {
                            confirmed: Some(
                                csi::validate_volume_capabilities_response::Confirmed {
                                    volume_context: req.volume_context,
                                    volume_capabilities: req.volume_capabilities,
                                    parameters: req.parameters,
                                    mutable_parameters: Default::default(),
                                },
                            ),
                            message: String::new(),
                        },
                        Err(e) => csi::ValidateVolumeCapabilitiesResponse {
                            confirmed: None,
                            message: e.to_string(),
                        },
                    };
                Ok(response)
            },
        )
        .await
        .map(Response::new)
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("ListVolumes", String::new(), move || {
            let (volumes, next) = manager.list_volumes(&req.starting_token, req.max_entries)?;
            Ok(csi::ListVolumesResponse {
                entries: volumes
                    .iter()
                    .map(|v| csi::list_volumes_response::Entry {
                        volume: Some(to_volume(v, manager.node_id())),
                        status: None,
                    })
                    .collect(),
                next_token: next.unwrap_or_default(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("GetCapacity", String::new(), move || {
            if !req.volume_capabilities.is_empty() {
                parse::capabilities(&req.volume_capabilities, "volume_capabilities")?;
            }
            // Capacity depends only on the pool; the other parameters are checked at create.
            let pool = req.parameters.get("pool").cloned();
            let elsewhere = req.accessible_topology.as_ref().is_some_and(|t| {
                t.segments
                    .get(crate::volume::TOPOLOGY_KEY)
                    .map(String::as_str)
                    != Some(manager.node_id())
            });
            if elsewhere {
                return Ok(csi::GetCapacityResponse::default());
            }
            let cap = manager.capacity(pool.as_deref())?;
            Ok(csi::GetCapacityResponse {
                available_capacity: cap.available_bytes as i64,
                maximum_volume_size: Some(cap.maximum_volume_bytes as i64),
                minimum_volume_size: Some(cap.minimum_volume_bytes as i64),
            })
        })
        .await
        .map(Response::new)
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("CreateSnapshot", log_id(&req.source_volume_id), move || {
            if req.name.is_empty() {
                return Err(VolumeError::InvalidArgument {
                    field: "name",
                    message: "is required".into(),
                });
            }
            if req.source_volume_id.is_empty() {
                return Err(VolumeError::InvalidArgument {
                    field: "source_volume_id",
                    message: "is required".into(),
                });
            }
            let backup_url = parse::snapshot_parameters(&req.parameters)?;
            let source = parse::existing_volume_id(&req.source_volume_id)?;
            let snapshot = manager.create_snapshot(&req.name, &source, backup_url.as_deref())?;
            if !snapshot.ready_to_use {
                // Its backup is uploading (or starts again here): the sidecar asks again
                // until it is ready.
                manager.ensure_upload(&snapshot.id)?;
            }
            Ok(csi::CreateSnapshotResponse {
                snapshot: Some(to_snapshot(&snapshot)),
            })
        })
        .await
        .map(Response::new)
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("DeleteSnapshot", log_id(&req.snapshot_id), move || {
            if req.snapshot_id.is_empty() {
                return Err(VolumeError::InvalidArgument {
                    field: "snapshot_id",
                    message: "is required".into(),
                });
            }
            manager.delete_snapshot(&req.snapshot_id)?;
            Ok(csi::DeleteSnapshotResponse {})
        })
        .await
        .map(Response::new)
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("ListSnapshots", String::new(), move || {
            // Ids sealvol never issued name nothing: an empty list, as the spec wants.
            let unknown = (!req.snapshot_id.is_empty()
                && VolumeId::parse_snapshot(&req.snapshot_id).is_err())
                || (!req.source_volume_id.is_empty()
                    && VolumeId::parse(&req.source_volume_id).is_err());
            let (snapshots, next) = if unknown {
                (Vec::new(), None)
            } else {
                manager.list_snapshots(
                    &req.snapshot_id,
                    &req.source_volume_id,
                    &req.starting_token,
                    req.max_entries,
                )?
            };
            Ok(csi::ListSnapshotsResponse {
                entries: snapshots
                    .iter()
                    .map(|s| csi::list_snapshots_response::Entry {
                        snapshot: Some(to_snapshot(s)),
                    })
                    .collect(),
                next_token: next.unwrap_or_default(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("GetSnapshot", log_id(&req.snapshot_id), move || {
            if req.snapshot_id.is_empty() {
                return Err(VolumeError::InvalidArgument {
                    field: "snapshot_id",
                    message: "is required".into(),
                });
            }
            let snapshot = manager.get_snapshot(&req.snapshot_id)?;
            Ok(csi::GetSnapshotResponse {
                snapshot: Some(to_snapshot(&snapshot)),
            })
        })
        .await
        .map(Response::new)
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let caps = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::ListVolumes,
            rpc::Type::GetCapacity,
            // No EXPAND_VOLUME: expansion is node-only. A volume lives on one node, and with
            // the controller service on every node a ControllerExpandVolume would reach
            // whichever node's csi-resizer holds the lease. Without this capability
            // csi-resizer uses its trivial resizer (it only updates the PV), and kubelet's
            // NodeExpandVolume on the node that holds the volume grows file and filesystem.
            // ControllerExpandVolume answers UNIMPLEMENTED (the generated default).
            rpc::Type::SingleNodeMultiWriter,
            // Snapshots and clones live beside their volume, on its node.
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::GetSnapshot,
            rpc::Type::CloneVolume,
        ];
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|t| csi::ControllerServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        }))
    }
}
