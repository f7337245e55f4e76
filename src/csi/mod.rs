//! gRPC adapters: CSI message in, validated domain call, CSI message out. No lifecycle logic
//! lives here; `volume/` decides.

mod controller;
mod identity;
mod node;
mod parse;
mod redact;
mod server;
mod status;

pub(crate) use server::{PluginInfo, ServeError, serve};

use std::time::Instant;

use tonic::Status;

use crate::volume::VolumeError;

/// The volume id as it may be logged: only once it is known to be well-formed (an unchecked
/// id is caller text and may carry anything).
pub(crate) fn log_id(raw: &str) -> String {
    match crate::volume::VolumeId::parse(raw) {
        Ok(id) => id.to_string(),
        Err(_) if raw.is_empty() => String::new(),
        Err(_) => "(malformed)".to_string(),
    }
}

/// Runs one blocking domain call off the async runtime and logs its outcome and latency in
/// one line. The request itself is never logged.
pub(crate) async fn run_blocking<T: Send + 'static>(
    method: &'static str,
    volume_id: String,
    call: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, Status> {
    let volume_id = volume_id.as_str();
    let start = Instant::now();
    let result = match tokio::task::spawn_blocking(call).await {
        Ok(r) => r.map_err(status::to_status),
        Err(e) => Err(Status::internal(format!("{method} did not complete: {e}"))),
    };
    let code = match &result {
        Ok(_) => "Ok".to_string(),
        Err(s) => format!("{:?}", s.code()),
    };
    crate::metrics::metrics().csi_call(method, &code, start.elapsed());
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    match &result {
        Ok(_) => tracing::info!(csi.method = method, volume.id = volume_id, latency_ms, "ok"),
        Err(s) if s.code() == tonic::Code::Internal || s.code() == tonic::Code::DataLoss => {
            tracing::error!(csi.method = method, volume.id = volume_id, latency_ms, code = ?s.code(), message = s.message(), "failed")
        }
        Err(s) => {
            tracing::warn!(csi.method = method, volume.id = volume_id, latency_ms, code = ?s.code(), message = s.message(), "refused")
        }
    }
    result
}
