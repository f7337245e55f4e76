//! Concurrency: one operation per volume at a time (a collision is ABORTED), and many volumes
//! at once without errors or leaks.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_call_on_a_busy_volume_is_aborted() {
    // Stage holds the volume's guard for 1.5 s at this point.
    let (node, mut c) = start_with(&[], &[("SEALVOL_PAUSE_AT", "stage.attached:1500")]).await;
    let id = create(&mut c, "pvc-busy", 16 * MIB).await;
    let other = create(&mut c, "pvc-other", 16 * MIB).await;
    let mut c1 = c.clone();
    let first = tokio::spawn({
        let req = node.stage(&id);
        async move { c1.node.node_stage_volume(req).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = refused(c.node.node_stage_volume(node.stage(&id)).await);
    assert_eq!(s.code(), Code::Aborted, "{}", s.message());
    assert_eq!(code(delete(&mut c, &id).await), Code::Aborted);
    // Another volume is not held up by this one's guard... (its stage pauses too, so only
    // check it does not fail)
    let mut c2 = c.clone();
    let second = tokio::spawn({
        let req = node.stage(&other);
        async move { c2.node.node_stage_volume(req).await }
    });
    first.await.unwrap().expect("the first stage completes");
    second
        .await
        .unwrap()
        .expect("a stage of another volume runs alongside");
    c.node
        .node_stage_volume(node.stage(&id))
        .await
        .expect("and the retry succeeds");
    for v in [&id, &other] {
        c.node.node_unstage_volume(node.unstage(v)).await.unwrap();
        delete(&mut c, v).await.unwrap();
    }
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_lifecycles_at_once_leave_nothing_behind() {
    let (node, c) = start().await;
    let node = std::sync::Arc::new(node);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (node, mut c) = (node.clone(), c.clone());
        tasks.spawn(async move {
            let pod = format!("pod-{i}");
            let (id, target) = ready(&node, &mut c, &format!("pvc-par-{i}"), 32 * MIB, &pod).await;
            std::fs::write(format!("{target}/f"), format!("{i}")).unwrap();
            assert_eq!(
                std::fs::read_to_string(format!("{target}/f")).unwrap(),
                format!("{i}")
            );
            teardown(&node, &mut c, &id, &pod).await;
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a lifecycle failed");
    }
    assert_clean(&node);
}
