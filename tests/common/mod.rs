//! Helpers for the integration tests: each test runs its own `sealvol node` in its own scratch
//! directory (so tests run in parallel), and the harness removes every mount and loop device
//! it left even when the test panics.
#![allow(dead_code, unused_imports)]

pub mod azure;
pub mod kube;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use sealvol::client::CsiClient;
pub use sealvol::harness::{ScratchNode, requests};
pub use sealvol::proto::csi::v1 as csi;
pub use tonic::Code;

pub use csi::volume_capability::access_mode::Mode;

pub const NONE: &[(&str, &str)] = &[("keyMode", "none")];
pub const MIB: i64 = 1 << 20;

/// Privileged tests must not pass silently without privileges.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these integration tests need root (loop devices, mounts); run them as root, as CI does"
    );
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sealvol"))
}

pub async fn start() -> (ScratchNode, CsiClient) {
    start_with(&[], &[]).await
}

pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> (ScratchNode, CsiClient) {
    require_root();
    let mut node = ScratchNode::new(&binary(), None)
        .expect("scratch dir")
        .with_args(args);
    let client = node.start(env).await.expect("node plugin starts");
    (node, client)
}

pub fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// The status of a call that must fail, with its message.
pub fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Status {
    r.expect_err("the call was expected to be refused")
}

pub async fn create(c: &mut CsiClient, name: &str, bytes: i64) -> String {
    create_with(c, name, bytes, NONE).await
}

pub async fn create_with(
    c: &mut CsiClient,
    name: &str,
    bytes: i64,
    params: &[(&str, &str)],
) -> String {
    c.controller
        .create_volume(requests::create(name, bytes, params))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("a volume")
        .volume_id
}

pub async fn delete(c: &mut CsiClient, id: &str) -> Result<(), tonic::Status> {
    c.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: Default::default(),
        })
        .await
        .map(|_| ())
}

/// Create, stage and publish for pod `pod`; returns the id and the target path.
pub async fn ready(
    node: &ScratchNode,
    c: &mut CsiClient,
    name: &str,
    bytes: i64,
    pod: &str,
) -> (String, String) {
    let id = create(c, name, bytes).await;
    c.node
        .node_stage_volume(node.stage(&id))
        .await
        .expect("stage");
    c.node
        .node_publish_volume(node.publish(&id, pod))
        .await
        .expect("publish");
    (id.clone(), node.target_path(pod, &id))
}

/// Unpublish, unstage and delete.
pub async fn teardown(node: &ScratchNode, c: &mut CsiClient, id: &str, pod: &str) {
    c.node
        .node_unpublish_volume(node.unpublish(id, pod))
        .await
        .expect("unpublish");
    c.node
        .node_unstage_volume(node.unstage(id))
        .await
        .expect("unstage");
    delete(c, id).await.expect("delete");
}

/// No mount, loop device or pool file is left.
pub fn assert_clean(node: &ScratchNode) {
    assert_eq!(node.mounts(), Vec::<PathBuf>::new(), "mounts left behind");
    assert_eq!(
        node.loop_devices(),
        Vec::<String>::new(),
        "loop devices left behind"
    );
    assert_eq!(
        node.pool_files(),
        Vec::<String>::new(),
        "pool files left behind"
    );
}

pub fn is_mounted(path: &str) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop device over a new sparse file of `bytes` under `dir` (detached by the harness).
pub fn loop_disk(dir: &Path, name: &str, bytes: u64) -> String {
    let file = dir.join(name);
    let f = std::fs::File::create(&file).expect("disk file");
    f.set_len(bytes).expect("disk size");
    run(
        "losetup",
        &["--find", "--show", file.to_str().expect("utf-8 path")],
    )
}

pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// `len` bytes that do not repeat within a block, varied by `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[1] ^ seed)
        .collect()
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether this machine lets ext4 grow while mounted (CAP_SYS_RESOURCE in the effective set);
/// the node plugin inherits the tests' capabilities.
pub fn can_resize_online() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(caps, 16).unwrap() & (1 << 24) != 0
}

/// The address the node plugin logs its metrics at (`--metrics-address`), from JSON or text
/// logs.
#[allow(dead_code)]
pub fn metrics_address(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("metrics listening"))
        .find_map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) => v["address"].as_str().map(str::to_string),
            Err(_) => l
                .split("address=")
                .nth(1)
                .and_then(|a| a.split_whitespace().next())
                .map(str::to_string),
        })
        .expect("the node logs its metrics address")
}

/// What GetCapacity says the node's pools can still hold.
#[allow(dead_code)]
pub async fn available_capacity(c: &CsiClient) -> i64 {
    c.clone()
        .controller
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .expect("GetCapacity")
        .into_inner()
        .available_capacity
}

/// A fake Kubernetes API that records the events posted to it.
#[allow(dead_code)]
pub async fn event_sink() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    let app = axum::Router::new().route(
        "/api/v1/namespaces/{ns}/events",
        axum::routing::post(move |body: String| {
            let sink = sink.clone();
            async move {
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str::<serde_json::Value>(&body).unwrap());
                axum::http::StatusCode::CREATED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, events)
}
