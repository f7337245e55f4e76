//! The CSI Node service: stage, publish, unpublish, unstage, stats, expansion, node info.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{PluginInfo, log_id, parse, run_blocking};
use crate::identity::PodToken;
use crate::proto::csi::v1 as csi;
use crate::volume::{Manager, PodAuth, PublishRequest, VolumeError, VolumeParams};

use csi::node_service_capability::{Rpc, Type, rpc};

pub(super) struct NodeService {
    pub(super) manager: Arc<Manager>,
    pub(super) info: PluginInfo,
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("NodeStageVolume", log_id(&req.volume_id), move || {
            let id = parse::volume_id(&req.volume_id)?;
            let cap = parse::capability(req.volume_capability.as_ref(), "volume_capability")?;
            manager.stage(&id, &req.staging_target_path, &cap)?;
            Ok(csi::NodeStageVolumeResponse {})
        })
        .await
        .map(Response::new)
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("NodeUnstageVolume", log_id(&req.volume_id), move || {
            let id = parse::volume_id(&req.volume_id)?;
            manager.unstage(&id, &req.staging_target_path)?;
            Ok(csi::NodeUnstageVolumeResponse {})
        })
        .await
        .map(Response::new)
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("NodePublishVolume", log_id(&req.volume_id), move || {
            let id = parse::volume_id(&req.volume_id)?;
            let capability =
                parse::capability(req.volume_capability.as_ref(), "volume_capability")?;
            let inline = if parse::is_inline(&req.volume_context) {
                Some(VolumeParams::from_inline_attributes(&parse::to_btree(
                    &req.volume_context,
                ))?)
            } else {
                None
            };
            let context = |key: &str| req.volume_context.get(key).cloned().unwrap_or_default();
            let auth = PodAuth {
                token: PodToken::from_request(
                    &req.secrets,
                    &req.volume_context,
                    manager.token_audience(),
                )
                .map_err(|e| e.to_string()),
                pod_name: context("csi.storage.k8s.io/pod.name"),
                pod_namespace: context("csi.storage.k8s.io/pod.namespace"),
                pod_uid: context("csi.storage.k8s.io/pod.uid"),
                service_account: context("csi.storage.k8s.io/serviceAccount.name"),
            };
            manager.publish(&PublishRequest {
                id,
                target: req.target_path,
                staging: Some(req.staging_target_path),
                read_only: req.readonly,
                capability,
                inline,
                auth,
            })?;
            Ok(csi::NodePublishVolumeResponse {})
        })
        .await
        .map(Response::new)
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("NodeUnpublishVolume", log_id(&req.volume_id), move || {
            let id = parse::volume_id(&req.volume_id)?;
            manager.unpublish(&id, &req.target_path)?;
            Ok(csi::NodeUnpublishVolumeResponse {})
        })
        .await
        .map(Response::new)
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("NodeGetVolumeStats", log_id(&req.volume_id), move || {
            // A request missing a field is malformed whatever its id names.
            if req.volume_path.is_empty() {
                return Err(VolumeError::InvalidArgument {
                    field: "volume_path",
                    message: "is required".into(),
                });
            }
            let id = parse::existing_volume_id(&req.volume_id)?;
            let stats = manager.stats(&id, &req.volume_path)?;
            let usage = stats
                .usage
                .map(|u| {
                    vec![
                        csi::VolumeUsage {
                            available: u.available_bytes as i64,
                            total: u.total_bytes as i64,
                            used: u.used_bytes as i64,
                            unit: csi::volume_usage::Unit::Bytes as i32,
                        },
                        csi::VolumeUsage {
                            available: u.free_inodes as i64,
                            total: u.total_inodes as i64,
                            used: u.used_inodes as i64,
                            unit: csi::volume_usage::Unit::Inodes as i32,
                        },
                    ]
                })
                .unwrap_or_default();
            Ok(csi::NodeGetVolumeStatsResponse {
                usage,
                volume_condition: Some(csi::VolumeCondition {
                    abnormal: stats.abnormal.is_some(),
                    message: stats
                        .abnormal
                        .unwrap_or_else(|| "volume is mounted and healthy".into()),
                }),
            })
        })
        .await
        .map(Response::new)
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let manager = Arc::clone(&self.manager);
        run_blocking("NodeExpandVolume", log_id(&req.volume_id), move || {
            // A request missing a field is malformed whatever its id names.
            if req.volume_path.is_empty() {
                return Err(VolumeError::InvalidArgument {
                    field: "volume_path",
                    message: "is required".into(),
                });
            }
            let id = parse::existing_volume_id(&req.volume_id)?;
            if req.volume_capability.is_some() {
                parse::capability(req.volume_capability.as_ref(), "volume_capability")?;
            }
            let capacity = manager.node_expand(
                &id,
                &req.volume_path,
                parse::capacity_range(req.capacity_range.as_ref()),
            )?;
            Ok(csi::NodeExpandVolumeResponse {
                capacity_bytes: capacity as i64,
            })
        })
        .await
        .map(Response::new)
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let caps = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ];
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|t| csi::NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.manager.node_id().to_string(),
            max_volumes_per_node: self.info.max_volumes,
            accessible_topology: Some(parse::node_topology(self.manager.node_id())),
        }))
    }
}
