//! The CSI calls end to end against a real node plugin: real loop devices, ext4 and mounts.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_capabilities_and_node_info() {
    let (node, mut c) = start_with(&["--max-volumes=110"], &[]).await;
    let info = c
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "sealvol.csi.io");
    assert!(!info.vendor_version.is_empty());
    assert_eq!(
        c.identity
            .probe(csi::ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );

    let caps = c
        .identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let text = format!("{caps:?}");
    use csi::plugin_capability::{service, volume_expansion};
    for wanted in [
        service::Type::ControllerService as i32,
        service::Type::VolumeAccessibilityConstraints as i32,
    ] {
        assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type, Some(csi::plugin_capability::Type::Service(s)) if s.r#type == wanted)), "{text}");
    }
    let expansion = if can_resize_online() {
        volume_expansion::Type::Online
    } else {
        volume_expansion::Type::Offline
    };
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type, Some(csi::plugin_capability::Type::VolumeExpansion(e)) if e.r#type == expansion as i32)), "{text}");

    let ni = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, node.node_id);
    assert_eq!(ni.max_volumes_per_node, 110);
    assert_eq!(
        ni.accessible_topology
            .unwrap()
            .segments
            .get("topology.sealvol.io/node"),
        Some(&node.node_id)
    );

    let cc = c
        .controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use csi::controller_service_capability::rpc::Type as C;
    let has = |t: C| {
        cc.capabilities.iter().any(|c| matches!(&c.r#type, Some(csi::controller_service_capability::Type::Rpc(r)) if r.r#type == t as i32))
    };
    for t in [C::CreateDeleteVolume, C::ListVolumes, C::GetCapacity] {
        assert!(has(t), "{t:?} missing");
    }
    assert!(!has(C::ExpandVolume), "expansion is node-only");
    let nc = c
        .node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use csi::node_service_capability::rpc::Type as N;
    let has = |t: N| {
        nc.capabilities.iter().any(|c| matches!(&c.r#type, Some(csi::node_service_capability::Type::Rpc(r)) if r.r#type == t as i32))
    };
    for t in [
        N::StageUnstageVolume,
        N::GetVolumeStats,
        N::ExpandVolume,
        N::VolumeCondition,
    ] {
        assert!(has(t), "{t:?} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_idempotent() {
    let (node, mut c) = start().await;
    let req = requests::create("pvc-idem", 64 * MIB, NONE);
    let first = c
        .controller
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let again = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(first.volume_id, again.volume_id);
    assert_eq!(first.capacity_bytes, 64 * MIB);
    assert_eq!(
        first.accessible_topology[0]
            .segments
            .get("topology.sealvol.io/node"),
        Some(&node.node_id)
    );
    assert_eq!(
        first.volume_context.get("keyMode").map(String::as_str),
        Some("none")
    );
    // Same name, incompatible request.
    let bigger = c
        .controller
        .create_volume(requests::create("pvc-idem", 128 * MIB, NONE))
        .await;
    assert_eq!(code(bigger), Code::AlreadyExists);
    let other_wipe = c
        .controller
        .create_volume(requests::create(
            "pvc-idem",
            64 * MIB,
            &[("keyMode", "none"), ("wipe", "zero")],
        ))
        .await;
    assert_eq!(code(other_wipe), Code::AlreadyExists);

    let id = first.volume_id;
    for _ in 0..2 {
        c.node
            .node_stage_volume(node.stage(&id))
            .await
            .expect("stage (again)");
    }
    for _ in 0..2 {
        c.node
            .node_publish_volume(node.publish(&id, "pod-a"))
            .await
            .expect("publish (again)");
    }
    let target = node.target_path("pod-a", &id);
    std::fs::write(format!("{target}/file"), b"payload").unwrap();
    let stats = c
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = &stats.usage[0];
    assert!(
        bytes.total > 50 * MIB && bytes.total <= 64 * MIB,
        "{stats:?}"
    );
    assert!(stats.usage[1].used > 0, "inodes: {stats:?}");
    assert!(!stats.volume_condition.unwrap().abnormal);

    for _ in 0..2 {
        c.node
            .node_unpublish_volume(node.unpublish(&id, "pod-a"))
            .await
            .expect("unpublish (again)");
    }
    assert!(
        !std::path::Path::new(&target).exists(),
        "target dir is removed"
    );
    for _ in 0..2 {
        c.node
            .node_unstage_volume(node.unstage(&id))
            .await
            .expect("unstage (again)");
    }
    for _ in 0..2 {
        delete(&mut c, &id).await.expect("delete (again)");
    }
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_several_publications() {
    let (node, mut c) = start().await;
    let (id, rw) = ready(&node, &mut c, "pvc-multi", 32 * MIB, "pod-rw").await;
    let mut ro_req = node.publish(&id, "pod-ro");
    ro_req.readonly = true;
    c.node
        .node_publish_volume(ro_req.clone())
        .await
        .expect("read-only publish");
    c.node
        .node_publish_volume(ro_req.clone())
        .await
        .expect("read-only publish again");
    let ro = node.target_path("pod-ro", &id);
    std::fs::write(format!("{rw}/shared"), b"from rw").unwrap();
    assert_eq!(std::fs::read(format!("{ro}/shared")).unwrap(), b"from rw");
    let err = std::fs::write(format!("{ro}/nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // The same target read-write now: incompatible.
    ro_req.readonly = false;
    assert_eq!(
        code(c.node.node_publish_volume(ro_req).await),
        Code::AlreadyExists
    );

    // A single-writer publication refuses a second one.
    let mut single = node.publish(&id, "pod-single");
    single.volume_capability = Some(requests::mount_capability(Mode::SingleNodeSingleWriter));
    assert_eq!(
        code(c.node.node_publish_volume(single).await),
        Code::FailedPrecondition
    );

    // In use: neither unstage nor delete.
    let s = refused(c.node.node_unstage_volume(node.unstage(&id)).await);
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("still published"), "{}", s.message());
    assert_eq!(code(delete(&mut c, &id).await), Code::FailedPrecondition);

    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod-ro"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(format!("{rw}/shared")).unwrap(), b"from rw");
    teardown(&node, &mut c, &id, "pod-rw").await;
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_needs_a_staged_volume_and_delete_an_unstaged_one() {
    let (node, mut c) = start().await;
    let id = create(&mut c, "pvc-order", 32 * MIB).await;
    let s = refused(c.node.node_publish_volume(node.publish(&id, "p")).await);
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    let s = refused(delete(&mut c, &id).await);
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message().contains("staged or published"),
        "{}",
        s.message()
    );
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_paginates() {
    let (_node, mut c) = start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&mut c, &format!("pvc-list-{i}"), 16 * MIB).await);
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .controller
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        pages += 1;
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);
    let all = c
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    assert_eq!(
        all.entries[0].volume.as_ref().unwrap().capacity_bytes,
        16 * MIB
    );
    let bad = c
        .controller
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: "garbage/..".into(),
        })
        .await;
    assert_eq!(code(bad), Code::Aborted);
    let neg = c
        .controller
        .list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await;
    assert_eq!(code(neg), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_counts_promises_and_topology() {
    let (node, mut c) = start().await;
    let cap = |c: &mut CsiClient, topo: Option<&str>| {
        let req = csi::GetCapacityRequest {
            volume_capabilities: vec![requests::mount_capability(Mode::SingleNodeWriter)],
            parameters: Default::default(),
            accessible_topology: topo.map(|n| csi::Topology {
                segments: [("topology.sealvol.io/node".to_string(), n.to_string())].into(),
            }),
        };
        let mut c = c.clone();
        async move { c.controller.get_capacity(req).await.unwrap().into_inner() }
    };
    let before = cap(&mut c, Some(&node.node_id)).await;
    assert!(before.available_capacity > 100 * MIB, "{before:?}");
    assert_eq!(before.minimum_volume_size, Some(16 * MIB));
    assert_eq!(
        cap(&mut c, Some("another-node")).await.available_capacity,
        0
    );

    // 60% of the pool fits once, not twice: a sparse (thin) file still counts as promised.
    // (Thin, too, so that the test does not allocate 60% of the machine's disk.)
    const THIN: &[(&str, &str)] = &[("keyMode", "none"), ("provisioning", "thin")];
    let big = (before.available_capacity / 100 * 60) / MIB * MIB;
    create_with(&mut c, "pvc-big-1", big, THIN).await;
    let after = cap(&mut c, None).await;
    assert!(
        after.available_capacity <= before.available_capacity - big,
        "{after:?} after promising {big}"
    );
    let s = refused(
        c.controller
            .create_volume(requests::create("pvc-big-2", big, THIN))
            .await,
    );
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());

    // Requisite topology that excludes this node.
    let mut elsewhere = requests::create("pvc-elsewhere", 16 * MIB, NONE);
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: [("topology.sealvol.io/node".to_string(), "node-b".to_string())].into(),
        }],
        preferred: vec![],
    });
    assert_eq!(
        code(c.controller.create_volume(elsewhere.clone()).await),
        Code::ResourceExhausted
    );
    elsewhere
        .accessibility_requirements
        .as_mut()
        .unwrap()
        .requisite
        .push(csi::Topology {
            segments: [("topology.sealvol.io/node".to_string(), node.node_id.clone())].into(),
        });
    c.controller
        .create_volume(elsewhere)
        .await
        .expect("requisite naming this node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_volume_capabilities() {
    let (_node, mut c) = start().await;
    let id = create(&mut c, "pvc-validate", 16 * MIB).await;
    let req = |id: &str, mode: Mode| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![requests::mount_capability(mode)],
        ..Default::default()
    };
    let ok = c
        .controller
        .validate_volume_capabilities(req(&id, Mode::SingleNodeMultiWriter))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = c
        .controller
        .validate_volume_capabilities(req(&id, Mode::MultiNodeMultiWriter))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(no.message.contains("one node"), "{}", no.message);
    let unknown = format!("sv-{}", "0".repeat(32));
    assert_eq!(
        code(
            c.controller
                .validate_volume_capabilities(req(&unknown, Mode::SingleNodeWriter))
                .await
        ),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_an_abnormal_volume() {
    let (node, mut c) = start().await;
    let (id, target) = ready(&node, &mut c, "pvc-stats", 32 * MIB, "pod").await;
    let stats = |c: &mut CsiClient, path: String| {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            c.node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: id,
                    volume_path: path,
                    staging_target_path: String::new(),
                })
                .await
        }
    };
    let staged = stats(&mut c, node.staging_path(&id))
        .await
        .unwrap()
        .into_inner();
    assert!(!staged.volume_condition.unwrap().abnormal);
    // The mount disappears behind the driver's back.
    nix::mount::umount2(target.as_str(), nix::mount::MntFlags::MNT_DETACH).unwrap();
    let gone = stats(&mut c, target.clone()).await.unwrap().into_inner();
    let cond = gone.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("not mounted"), "{}", cond.message);
    assert!(gone.usage.is_empty());
    let missing = format!("{}/pods/none/volumes/x/mount", node.kubelet_dir.display());
    assert_eq!(code(stats(&mut c, missing).await), Code::NotFound);
    teardown(&node, &mut c, &id, "pod").await;
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_releases_blocks_and_zero_wipe_overwrites() {
    // Stop just after the blocks are released, before the unlink, to look at the file.
    let (mut node, mut c) = start_with(&[], &[("SEALVOL_CRASH_AT", "delete.released")]).await;
    let (id, target) = ready(&node, &mut c, "pvc-discard", 32 * MIB, "pod").await;
    std::fs::write(format!("{target}/data"), vec![0x5a; 4 << 20]).unwrap();
    nix::unistd::sync();
    let img = node.pool_dir.join(format!("{id}.img"));
    assert!(allocated_bytes(&img) >= 4 << 20);
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod"))
        .await
        .unwrap();
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    assert!(
        delete(&mut c, &id).await.is_err(),
        "the node stops at the crash point"
    );
    let deleting = node.pool_dir.join(format!("{id}.img.deleting"));
    assert_eq!(allocated_bytes(&deleting), 0, "every block released");
    node.kill();
    let mut c = node.start(&[]).await.unwrap();
    assert!(!deleting.exists(), "recovery finished the delete");
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);

    // wipe=zero: the data is overwritten before the blocks are released.
    node.kill();
    let mut c = node
        .start(&[("SEALVOL_CRASH_AT", "delete.wiped")])
        .await
        .unwrap();
    let id = create_with(
        &mut c,
        "pvc-zero",
        32 * MIB,
        &[("keyMode", "none"), ("wipe", "zero")],
    )
    .await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    c.node
        .node_publish_volume(node.publish(&id, "pod"))
        .await
        .unwrap();
    let marker = b"ZERO-WIPE-MARKER-7f3a";
    std::fs::write(
        format!("{}/m", node.target_path("pod", &id)),
        marker.repeat(1000),
    )
    .unwrap();
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod"))
        .await
        .unwrap();
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    let img = node.pool_dir.join(format!("{id}.img"));
    assert!(
        contains(&std::fs::read(&img).unwrap(), marker),
        "the marker is on disk before the wipe"
    );
    assert!(delete(&mut c, &id).await.is_err());
    let deleting = node.pool_dir.join(format!("{id}.img.deleting"));
    let bytes = std::fs::read(&deleting).unwrap();
    assert!(!contains(&bytes, marker), "the marker survived wipe=zero");
    assert!(bytes.iter().all(|b| *b == 0), "wipe=zero leaves only zeros");
    node.kill();
    let mut c = node.start(&[]).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_one_json_line_per_call_without_secrets() {
    let (node, mut c) = start_with(&["--log-format=json"], &[]).await;
    let (id, _) = ready(&node, &mut c, "pvc-logs", 16 * MIB, "pod").await;
    let token = "eyJhbGciOiJSUzI1NiJ9.TOKEN-THAT-MUST-NOT-BE-LOGGED.sig";
    let mut republish = node.publish(&id, "pod");
    let tokens = format!(
        r#"{{"api://AzureADTokenExchange":{{"token":"{token}","expirationTimestamp":"2030-01-01T00:00:00Z"}}}}"#
    );
    republish.secrets.insert(
        "csi.storage.k8s.io/serviceAccount.tokens".into(),
        tokens.clone(),
    );
    republish
        .volume_context
        .insert("csi.storage.k8s.io/serviceAccount.tokens".into(), tokens);
    c.node.node_publish_volume(republish).await.unwrap();
    let mut bad = node.publish(&id, "pod");
    bad.volume_id = format!("../{token}");
    assert_eq!(
        code(c.node.node_publish_volume(bad).await),
        Code::InvalidArgument
    );
    teardown(&node, &mut c, &id, "pod").await;

    let log = node.log();
    assert!(
        !log.contains("TOKEN-THAT-MUST-NOT-BE-LOGGED"),
        "a token reached the log:\n{log}"
    );
    let calls: Vec<serde_json::Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .filter(|v| v.get("csi.method").is_some())
        .collect();
    let methods: Vec<&str> = calls
        .iter()
        .map(|v| v["csi.method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "CreateVolume",
            "NodeStageVolume",
            "NodePublishVolume",
            "NodePublishVolume",
            "NodePublishVolume",
            "NodeUnpublishVolume",
            "NodeUnstageVolume",
            "DeleteVolume"
        ]
    );
    assert!(calls.iter().all(|v| v["latency_ms"].as_f64().is_some()));
    assert_eq!(calls[4]["code"].as_str(), Some("InvalidArgument"));
}
