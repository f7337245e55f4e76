//! Malformed and hostile requests: each is refused with the CSI code the spec names, a message
//! that names the field, and nothing created or mounted.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

fn bad_ids() -> Vec<String> {
    vec![
        String::new(),
        "../../etc".into(),
        format!("sv-{}/x", "0".repeat(30)),
        format!("sv-{}/..", "0".repeat(32)),
        format!("sv-{}", "0".repeat(33)),
        "x".repeat(10_000),
        "SV-00000000000000000000000000000000".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_volume_ids_are_refused_and_never_reach_a_path() {
    let (node, mut c) = start().await;
    for id in bad_ids() {
        let mut stage = node.stage("sv-00000000000000000000000000000000");
        stage.volume_id = id.clone();
        let s = refused(c.node.node_stage_volume(stage).await);
        assert_eq!(s.code(), Code::InvalidArgument, "{id:?}");
        assert!(s.message().starts_with("volume_id"), "{}", s.message());
        assert!(
            s.message().len() < 400,
            "the message echoes the oversized id"
        );
        let mut publish = node.publish("sv-00000000000000000000000000000000", "p");
        publish.volume_id = id.clone();
        assert_eq!(
            code(c.node.node_publish_volume(publish).await),
            Code::InvalidArgument
        );
        let mut unpublish = node.unpublish("sv-00000000000000000000000000000000", "p");
        unpublish.volume_id = id.clone();
        assert_eq!(
            code(c.node.node_unpublish_volume(unpublish).await),
            Code::InvalidArgument
        );
        // Calls about a volume that must exist: an id sealvol never issued names none, so
        // NOT_FOUND, and a delete of it is done (the CSI spec, and csi-sanity); an empty id is
        // still a malformed request.
        let (absent, deleted) = if id.is_empty() {
            (Code::InvalidArgument, Code::InvalidArgument)
        } else {
            (Code::NotFound, Code::Ok)
        };
        assert_eq!(code(delete(&mut c, &id).await), deleted, "{id:?}");
        let validate = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![requests::mount_capability(
                csi::volume_capability::access_mode::Mode::SingleNodeWriter,
            )],
            ..Default::default()
        };
        let s = refused(c.controller.validate_volume_capabilities(validate).await);
        assert_eq!(s.code(), absent, "{id:?}");
        assert!(s.message().contains("volume_id"), "{}", s.message());
        assert!(
            s.message().len() < 400,
            "the message echoes the oversized id"
        );
        let stats = csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: node.staging_path("sv-00000000000000000000000000000000"),
            staging_target_path: String::new(),
        };
        assert_eq!(code(c.node.node_get_volume_stats(stats).await), absent);
        let expand = csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: node.staging_path("sv-00000000000000000000000000000000"),
            ..Default::default()
        };
        assert_eq!(code(c.node.node_expand_volume(expand).await), absent);
    }
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_volumes_are_not_found_and_delete_is_ok() {
    let (node, mut c) = start().await;
    let id = format!("sv-{}", "ab".repeat(16));
    assert_eq!(
        code(c.node.node_stage_volume(node.stage(&id)).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.node.node_publish_volume(node.publish(&id, "p")).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.node.node_unstage_volume(node.unstage(&id)).await),
        Code::NotFound
    );
    // Unpublishing what is not mounted is done (kubelet retries after a crash).
    assert_eq!(
        code(c.node.node_unpublish_volume(node.unpublish(&id, "p")).await),
        Code::Ok
    );
    delete(&mut c, &id)
        .await
        .expect("deleting an unknown volume is idempotent success");
    let nexp = csi::NodeExpandVolumeRequest {
        volume_id: id.clone(),
        volume_path: node.staging_path(&id),
        ..Default::default()
    };
    assert_eq!(code(c.node.node_expand_volume(nexp).await), Code::NotFound);
    let stats = csi::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: node.staging_path(&id),
        staging_target_path: String::new(),
    };
    assert_eq!(
        code(c.node.node_get_volume_stats(stats).await),
        Code::NotFound
    );
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_kubelet_dir_are_refused() {
    let (node, mut c) = start().await;
    let id = create(&mut c, "pvc-paths", 16 * MIB).await;
    let outside = node.root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let kubelet = node.kubelet_dir.display().to_string();
    std::os::unix::fs::symlink(&outside, node.kubelet_dir.join("escape")).unwrap();
    let bad = [
        outside.join("stage").display().to_string(),
        "relative/globalmount".to_string(),
        format!("{kubelet}/../outside/stage"),
        format!("{kubelet}/./plugins/x"),
        format!("{kubelet}/escape/stage"),
        kubelet.clone(),
        "/".to_string(),
        format!("{kubelet}/{}", "d".repeat(5000)),
    ];
    for path in &bad {
        let mut stage = node.stage(&id);
        stage.staging_target_path = path.clone();
        let s = refused(c.node.node_stage_volume(stage).await);
        assert_eq!(s.code(), Code::InvalidArgument, "{path}: {}", s.message());
        assert!(
            s.message().starts_with("staging_target_path"),
            "{}",
            s.message()
        );
    }
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    for path in &bad {
        let mut publish = node.publish(&id, "p");
        publish.target_path = path.clone();
        let s = refused(c.node.node_publish_volume(publish).await);
        assert_eq!(s.code(), Code::InvalidArgument, "{path}");
        assert!(s.message().starts_with("target_path"), "{}", s.message());
    }
    // Stats of a path that cannot be this node's: no volume is there (NOT_FOUND), and it is
    // never followed.
    for path in &bad {
        let stats = csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: path.clone(),
            staging_target_path: String::new(),
        };
        let s = refused(c.node.node_get_volume_stats(stats).await);
        assert_eq!(s.code(), Code::NotFound, "{path}: {}", s.message());
        assert!(s.message().starts_with("volume_path"), "{}", s.message());
    }
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing was created outside"
    );
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_ranges_parameters_and_capabilities() {
    let (node, mut c) = start().await;
    let with_range = |required: i64, limit: i64| {
        let mut r = requests::create("pvc-range", 0, NONE);
        r.capacity_range = Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        });
        r
    };
    let s = refused(
        c.controller
            .create_volume(with_range(64 * MIB, 32 * MIB))
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("capacity_range"), "{}", s.message());
    assert_eq!(
        code(c.controller.create_volume(with_range(-1, 0)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.controller.create_volume(with_range(0, MIB)).await),
        Code::OutOfRange
    );
    let s = refused(c.controller.create_volume(with_range(1 << 60, 0)).await);
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    let default = c
        .controller
        .create_volume(with_range(0, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        default.volume.unwrap().capacity_bytes,
        1 << 30,
        "default capacity is 1 GiB"
    );

    let params_case = |params: &[(&str, &str)]| requests::create("pvc-params", 16 * MIB, params);
    let s = refused(
        c.controller
            .create_volume(params_case(&[("keyMode", "none"), ("colour", "blue")]))
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("colour")
            && s.message()
                .contains("accepted: pool, fsType, keyMode, wipe"),
        "{}",
        s.message()
    );
    let s = refused(c.controller.create_volume(params_case(&[])).await);
    assert!(
        s.message().contains("keyVaultURL") && s.message().contains("keyvault-key"),
        "{}",
        s.message()
    );
    for (k, v) in [
        ("keyMode", "keyvault-key"),
        ("keyMode", "keyvault-secret"),
        ("keyMode", "rot13"),
        ("wipe", "shred"),
        ("fsType", "xfs"),
        ("pool", "nope"),
    ] {
        let mut p = vec![("keyMode", "none")];
        p.retain(|(pk, _)| *pk != k);
        p.push((k, v));
        let s = refused(c.controller.create_volume(params_case(&p)).await);
        assert_eq!(s.code(), Code::InvalidArgument, "{k}={v}");
        assert!(
            s.message().contains(k) || s.message().contains("pool"),
            "{k}: {}",
            s.message()
        );
    }
    // Keys external-provisioner adds are fine.
    c.controller
        .create_volume(params_case(&[
            ("keyMode", "none"),
            ("csi.storage.k8s.io/pvc/name", "x"),
            ("csi.storage.k8s.io/pvc/namespace", "y"),
        ]))
        .await
        .unwrap();

    let mut block = requests::create("pvc-block", 16 * MIB, NONE);
    block.volume_capabilities[0].access_type =
        Some(csi::volume_capability::AccessType::Block(Default::default()));
    let s = refused(c.controller.create_volume(block).await);
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("dm-crypt"), "{}", s.message());
    let mut multi = requests::create("pvc-multi", 16 * MIB, NONE);
    multi.volume_capabilities = vec![requests::mount_capability(Mode::MultiNodeMultiWriter)];
    assert_eq!(
        code(c.controller.create_volume(multi).await),
        Code::InvalidArgument
    );
    let mut none = requests::create("pvc-nocaps", 16 * MIB, NONE);
    none.volume_capabilities.clear();
    assert_eq!(
        code(c.controller.create_volume(none).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller
                .create_volume(requests::create("", 16 * MIB, NONE))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller
                .create_volume(requests::create(&"n".repeat(300), 16 * MIB, NONE))
                .await
        ),
        Code::InvalidArgument
    );
    let mut flags = requests::create("pvc-flags", 16 * MIB, NONE);
    if let Some(csi::volume_capability::AccessType::Mount(m)) =
        flags.volume_capabilities[0].access_type.as_mut()
    {
        m.mount_flags = vec!["exec".into()];
    }
    assert_eq!(
        code(c.controller.create_volume(flags).await),
        Code::InvalidArgument
    );

    // Node side: a block capability at stage.
    let id = create(&mut c, "pvc-nodecap", 16 * MIB).await;
    let mut stage = node.stage(&id);
    stage.volume_capability.as_mut().unwrap().access_type =
        Some(csi::volume_capability::AccessType::Block(Default::default()));
    assert_eq!(
        code(c.node.node_stage_volume(stage).await),
        Code::InvalidArgument
    );
    assert!(node.mounts().is_empty());
}
