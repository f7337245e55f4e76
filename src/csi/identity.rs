//! The CSI Identity service: who the plugin is, what it can do, whether it is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::PluginInfo;
use crate::proto::csi::v1 as csi;
use crate::volume::Manager;

use csi::plugin_capability::{Service, Type, VolumeExpansion, service, volume_expansion};

pub(super) struct IdentityService {
    pub(super) manager: Arc<Manager>,
    pub(super) info: PluginInfo,
}

fn service_cap(t: service::Type) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(Type::Service(Service { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.info.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service_cap(service::Type::ControllerService),
                service_cap(service::Type::VolumeAccessibilityConstraints),
                csi::PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: if self.info.online_expansion {
                            volume_expansion::Type::Online as i32
                        } else {
                            volume_expansion::Type::Offline as i32
                        },
                    })),
                },
            ],
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let manager = Arc::clone(&self.manager);
        let ready = match tokio::task::spawn_blocking(move || manager.probe()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "probe: not ready");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "probe did not complete");
                false
            }
        };
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
