//! Crash and restart: the driver is killed (abort, as kill -9) at each step of a lifecycle;
//! after a restart the interrupted call is repeated and completes, the data a user wrote is
//! still there, and nothing is leaked. Also: mounts of live volumes survive a restart, and
//! mounts and loop devices that belong to nothing are cleaned up.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Create,
    Stage,
    Publish,
    Unpublish,
    Unstage,
    Delete,
}

async fn call(
    step: Step,
    node: &ScratchNode,
    c: &mut CsiClient,
    id: &mut String,
) -> Result<(), tonic::Status> {
    match step {
        Step::Create => {
            let v = c
                .controller
                .create_volume(requests::create("pvc-crash", 32 * MIB, NONE))
                .await?;
            *id = v.into_inner().volume.expect("volume").volume_id;
            Ok(())
        }
        Step::Stage => c.node.node_stage_volume(node.stage(id)).await.map(|_| ()),
        Step::Publish => c
            .node
            .node_publish_volume(node.publish(id, "pod"))
            .await
            .map(|_| ()),
        Step::Unpublish => c
            .node
            .node_unpublish_volume(node.unpublish(id, "pod"))
            .await
            .map(|_| ()),
        Step::Unstage => c
            .node
            .node_unstage_volume(node.unstage(id))
            .await
            .map(|_| ()),
        Step::Delete => delete(c, id).await,
    }
}

/// Runs a lifecycle with the driver set to crash at `point`; the step that crashes is
/// repeated after a restart.
async fn crash_at(point: &str) {
    let (mut node, mut c) = start_with(&[], &[("SEALVOL_CRASH_AT", point)]).await;
    let mut id = String::new();
    let mut crashed = false;
    let marker = b"user data that must survive a driver crash";
    for step in [
        Step::Create,
        Step::Stage,
        Step::Publish,
        Step::Unpublish,
        Step::Unstage,
        Step::Delete,
    ] {
        if step == Step::Unpublish {
            let target = node.target_path("pod", &id);
            assert_eq!(
                std::fs::read(format!("{target}/keep")).unwrap(),
                marker,
                "data lost"
            );
        }
        if let Err(status) = call(step, &node, &mut c, &mut id).await {
            assert!(!crashed, "{step:?} failed after the restart: {status:?}");
            // The driver must have died at the crash point, not refused the call.
            let mut exited = None;
            for _ in 0..100 {
                exited = node.try_wait();
                if exited.is_some() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(
                exited.is_some(),
                "{step:?} failed without a crash: {status:?}"
            );
            crashed = true;
            c = node.start(&[]).await.expect("restart");
            call(step, &node, &mut c, &mut id)
                .await
                .unwrap_or_else(|s| panic!("{step:?} repeated after the crash at {point}: {s:?}"));
        }
        if step == Step::Publish {
            std::fs::write(format!("{}/keep", node.target_path("pod", &id)), marker).unwrap();
        }
    }
    assert!(crashed, "crash point {point} was never reached");
    assert_clean(&node);
    let listed = c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
}

macro_rules! crash_tests {
    ($($name:ident => $point:literal),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crash_at($point).await;
            }
        )*
    };
}

crash_tests! {
    crash_before_create_rename => "create.before_rename",
    crash_after_loop_attach => "stage.attached",
    crash_after_mkfs => "stage.formatted",
    crash_after_stage_mount => "stage.mounted",
    crash_after_bind_mount => "publish.bound",
    crash_after_unpublish_unmount => "unpublish.unmounted",
    crash_after_unstage_unmount => "unstage.unmounted",
    crash_after_delete_rename => "delete.renamed",
    crash_after_wipe => "delete.wiped",
    crash_after_block_release => "delete.released",
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_while_creating_an_inline_volume() {
    let (mut node, mut c) = start_with(&[], &[("SEALVOL_CRASH_AT", "inline.created")]).await;
    let id = format!("csi-{}", "7".repeat(64));
    let mut req = node.publish(&id, "pod");
    req.staging_target_path = String::new();
    req.volume_context = [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("keyMode", "none"),
        ("size", "32Mi"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert!(c.node.node_publish_volume(req.clone()).await.is_err());
    c = node.start(&[]).await.unwrap();
    c.node
        .node_publish_volume(req)
        .await
        .expect("kubelet's retry completes the publish");
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod"))
        .await
        .unwrap();
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_live_volumes_mounted() {
    let (mut node, mut c) = start().await;
    let (id, target) = ready(&node, &mut c, "pvc-live", 32 * MIB, "pod").await;
    std::fs::write(format!("{target}/f"), b"still here").unwrap();
    let staged_loops = node.loop_devices();
    node.kill();
    let mut c = node.start(&[]).await.unwrap();
    assert!(
        is_mounted(&target),
        "a restart must not unmount a pod's volume"
    );
    assert_eq!(node.loop_devices(), staged_loops);
    assert_eq!(std::fs::read(format!("{target}/f")).unwrap(), b"still here");
    c.node
        .node_stage_volume(node.stage(&id))
        .await
        .expect("re-stage");
    c.node
        .node_publish_volume(node.publish(&id, "pod"))
        .await
        .expect("republish");
    assert!(
        node.log().contains("kept_volumes_in_use: 1"),
        "{}",
        node.log()
    );
    teardown(&node, &mut c, &id, "pod").await;
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_and_loops_of_nothing_are_cleaned_up() {
    let (mut node, mut c) = start().await;
    let (id, target) = ready(&node, &mut c, "pvc-orphan", 32 * MIB, "pod").await;
    node.kill();
    // The volume's file disappears while the driver is down: its mounts belong to nothing.
    std::fs::remove_file(node.pool_dir.join(format!("{id}.img"))).unwrap();
    // And a stray partial create.
    std::fs::write(
        node.pool_dir
            .join(format!("sv-{}.img.creating", "1".repeat(32))),
        b"partial",
    )
    .unwrap();
    let _c = node.start(&[]).await.unwrap();
    assert!(!is_mounted(&target));
    assert!(!is_mounted(&node.staging_path(&id)));
    assert!(
        node.log()
            .contains("released a loop device that belonged to no volume"),
        "{}",
        node.log()
    );
    // Lazy unmounts and autoclear finish asynchronously.
    for _ in 0..100 {
        if node.loop_devices().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_clean(&node);
}

/// Two node plugins whose pools share a filesystem (as parallel tests do, or two drivers on
/// one host): one plugin's start never releases the other's loop devices, even over an
/// unlinked volume file, which the kernel cannot tell apart by path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_plugins_orphans_are_left_to_it() {
    let (mut mine, _c) = start().await;
    let (mut other, mut other_c) = start().await;
    let (id, target) = ready(&other, &mut other_c, "pvc-theirs", 32 * MIB, "pod").await;
    other.kill();
    std::fs::remove_file(other.pool_dir.join(format!("{id}.img"))).unwrap();
    mine.kill();
    let _c = mine.start(&[]).await.unwrap();
    assert!(
        !mine.log().contains("released a loop device"),
        "{}",
        mine.log()
    );
    assert!(is_mounted(&target), "the other plugin's mounts are its own");
    assert_eq!(other.loop_devices().len(), 1);
    // Its own plugin releases them.
    let _other_c = other.start(&[]).await.unwrap();
    assert!(
        other
            .log()
            .contains("released a loop device that belonged to no volume")
    );
    for _ in 0..100 {
        if other.loop_devices().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_clean(&other);
    assert_clean(&mine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced() {
    let (mut node, _c) = start().await;
    node.kill();
    assert!(node.socket.exists(), "kill -9 leaves the socket behind");
    let mut c = node.start(&[]).await.expect("start over a stale socket");
    assert_eq!(
        c.identity
            .probe(csi::ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&node.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "only root may talk to the driver");
}
