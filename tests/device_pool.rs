//! Pools on raw disks (loop devices stand in for NVMe disks here): blank disks are formatted,
//! foreign ones refused unless taken over, known ones reused, volumes placed on the disk with
//! the most free space.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

async fn start_with_disks(
    disks: &[String],
    extra: &[&str],
) -> Result<(ScratchNode, CsiClient), String> {
    require_root();
    let pool = format!("--pool=disks=device:{}", disks.join(","));
    let mut args = vec![pool.as_str()];
    args.extend_from_slice(extra);
    let mut node = ScratchNode::new(&binary(), None).unwrap().with_args(&args);
    match node.start(&[]).await {
        Ok(c) => Ok((node, c)),
        Err(e) => Err(e.to_string()),
    }
}

/// Scratch space for the disk images, cleaned up (and its loop devices detached) on drop.
fn disk_dir() -> ScratchNode {
    ScratchNode::new(&binary(), None).unwrap()
}

const DISKS: &[(&str, &str)] = &[("keyMode", "none"), ("pool", "disks")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_disks_are_formatted_and_volumes_spread_over_them() {
    let scratch = disk_dir();
    let a = loop_disk(&scratch.root, "a.img", 512 << 20);
    let b = loop_disk(&scratch.root, "b.img", 512 << 20);
    let (node, mut c) = start_with_disks(&[a.clone(), b.clone()], &[])
        .await
        .unwrap();
    for d in [&a, &b] {
        assert_eq!(run("blkid", &["-o", "value", "-s", "LABEL", d]), "sealvol");
    }
    let v1 = create_with(&mut c, "pvc-d1", 200 * MIB, DISKS).await;
    let v2 = create_with(&mut c, "pvc-d2", 200 * MIB, DISKS).await;
    let disks_dir = node.state_dir.join("pools/disks");
    let mut homes = Vec::new();
    for v in [&v1, &v2] {
        let home = std::fs::read_dir(&disks_dir)
            .unwrap()
            .flatten()
            .find(|d| d.path().join(format!("{v}.img")).exists())
            .map(|d| d.path());
        homes.push(home.expect("volume file on one of the disks"));
    }
    assert_ne!(
        homes[0], homes[1],
        "the second volume goes to the emptier disk"
    );
    // 512 MiB disks, two 200 MiB volumes promised: a third 400 MiB volume fits nowhere.
    let s = refused(
        c.controller
            .create_volume(requests::create("pvc-d3", 400 * MIB, DISKS))
            .await,
    );
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    let cap = c
        .controller
        .get_capacity(csi::GetCapacityRequest {
            parameters: [("pool".to_string(), "disks".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cap.maximum_volume_size.unwrap() < 400 * MIB, "{cap:?}");

    c.node.node_stage_volume(node.stage(&v1)).await.unwrap();
    c.node
        .node_publish_volume(node.publish(&v1, "pod"))
        .await
        .unwrap();
    std::fs::write(
        format!("{}/f", node.target_path("pod", &v1)),
        b"on a disk pool",
    )
    .unwrap();
    teardown(&node, &mut c, &v1, "pod").await;
    delete(&mut c, &v2).await.unwrap();
    drop(node);
    drop(scratch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_disks_are_refused_unless_taken_over() {
    let scratch = disk_dir();
    let fs_disk = loop_disk(&scratch.root, "fs.img", 128 << 20);
    run("mkfs.ext4", &["-q", "-L", "somebodys", &fs_disk]);
    let pt_disk = loop_disk(&scratch.root, "pt.img", 128 << 20);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo 'label: gpt' | sfdisk -q {pt_disk}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let e = start_with_disks(std::slice::from_ref(&fs_disk), &[])
        .await
        .err()
        .expect("refused");
    assert!(
        e.contains("TYPE=ext4") && e.contains("take-over-disks"),
        "{e}"
    );
    assert_eq!(
        run("blkid", &["-o", "value", "-s", "LABEL", &fs_disk]),
        "somebodys",
        "untouched"
    );
    let e = start_with_disks(std::slice::from_ref(&pt_disk), &[])
        .await
        .err()
        .expect("refused");
    assert!(e.contains("PTTYPE=gpt"), "{e}");

    let (node, mut c) =
        start_with_disks(&[fs_disk.clone(), pt_disk.clone()], &["--take-over-disks"])
            .await
            .unwrap();
    assert_eq!(
        run("blkid", &["-o", "value", "-s", "LABEL", &fs_disk]),
        "sealvol"
    );
    create_with(&mut c, "pvc-taken", 32 * MIB, DISKS).await;
    drop(node);
    drop(scratch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_sealvol_formatted_is_reused_after_a_reboot() {
    let scratch = disk_dir();
    let disk = loop_disk(&scratch.root, "r.img", 256 << 20);
    let (mut node, mut c) = start_with_disks(std::slice::from_ref(&disk), &[])
        .await
        .unwrap();
    let id = create_with(&mut c, "pvc-reboot", 64 * MIB, DISKS).await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(node.publish(&id, "pod"))
        .await
        .unwrap();
    std::fs::write(
        format!("{}/f", node.target_path("pod", &id)),
        b"survives a reboot",
    )
    .unwrap();

    // A driver restart keeps the disk mounted and the volume published.
    node.kill();
    let mut c = node.start(&[]).await.unwrap();
    assert_eq!(
        std::fs::read(format!("{}/f", node.target_path("pod", &id))).unwrap(),
        b"survives a reboot"
    );
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod"))
        .await
        .unwrap();
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();

    // A "reboot": the driver stops and every mount goes away; the disk is mounted again, not
    // formatted again, and the volume is still there with its data.
    node.kill();
    for m in node.mounts() {
        nix::mount::umount2(&m, nix::mount::MntFlags::empty()).unwrap();
    }
    let mut c = node.start(&[]).await.unwrap();
    let listed = c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(node.publish(&id, "pod"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(format!("{}/f", node.target_path("pod", &id))).unwrap(),
        b"survives a reboot"
    );
    teardown(&node, &mut c, &id, "pod").await;

    // The same disk named for another pool is refused.
    node.kill();
    for m in node.mounts() {
        nix::mount::umount2(&m, nix::mount::MntFlags::empty()).unwrap();
    }
    let mut other = ScratchNode::new(&binary(), None)
        .unwrap()
        .with_args(&[&format!("--pool=elsewhere=device:{disk}")]);
    let e = other.start(&[]).await.err().expect("refused").to_string();
    assert!(e.contains("belongs to pool \"disks\""), "{e}");
    drop(other);
    drop(node);
    drop(scratch);
}
