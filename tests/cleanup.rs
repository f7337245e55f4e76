//! The cleanup controller (`sealvol cleanup`) and the node plugin's lost-volume check, against
//! a fake Kubernetes API: PVs of nodes that are gone are released after the grace and not
//! before, PVs marked lost at once, nothing of another driver or a live node is touched; only
//! the lease holder acts, and it gives the lease up when stopped. A node plugin that starts
//! on a pool without its PVs' volumes marks exactly those PVs lost, and says so.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::kube::{self, Objects, pv};
use common::*;

const DRIVER: &str = "sealvol.csi.io";

/// A `sealvol cleanup` process, killed on drop (also when the test fails).
struct Controller {
    child: Child,
    log: tempfile::NamedTempFile,
    _token: tempfile::NamedTempFile,
}

impl Controller {
    fn start(api: &str, identity: &str, extra: &[&str]) -> Controller {
        let token = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token.path(), format!("token-of-{identity}")).unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(binary())
            .args([
                "cleanup",
                &format!("--kube-api-url={api}"),
                &format!("--kube-token-file={}", token.path().display()),
                "--lease-namespace=sealvol",
                &format!("--identity={identity}"),
                "--interval=100ms",
                "--lease-duration=2s",
                "--log-level=debug",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("sealvol cleanup starts");
        Controller {
            child,
            log,
            _token: token,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cluster(nodes: &[&str], pvs: Vec<serde_json::Value>) -> Objects {
    Objects {
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        pvs: pvs
            .into_iter()
            .map(|p| (p["metadata"]["name"].as_str().unwrap().to_string(), p))
            .collect(),
        ..Objects::default()
    }
}

fn lost(mut pv: serde_json::Value, why: &str) -> serde_json::Value {
    pv["metadata"]["annotations"] = serde_json::json!({"sealvol.io/lost": why});
    pv
}

const WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_pvs_of_gone_nodes_and_lost_ones_and_nothing_else() {
    let (api, objects) = kube::serve(cluster(
        &["live"],
        vec![
            pv("gone-bound", DRIVER, "sv-1", "gone", "Bound"),
            pv("gone-released", DRIVER, "sv-2", "gone", "Released"),
            lost(
                pv("wiped", DRIVER, "sv-3", "live", "Bound"),
                "node live started without it",
            ),
            pv("live-bound", DRIVER, "sv-4", "live", "Bound"),
            pv("other-driver", "other.csi.io", "x-1", "gone", "Bound"),
        ],
    ))
    .await;
    let controller = Controller::start(&api, "c1", &["--node-gone-grace=0"]);
    let released = kube::wait_for(&objects, WITHIN, |o| {
        ["gone-bound", "gone-released", "wiped"]
            .iter()
            .all(|n| !o.pvs.contains_key(*n))
    })
    .await;
    assert!(released, "not released; log:\n{}", controller.log());
    // A few more passes: what must stay, stays.
    let passes = objects.lock().unwrap().pv_lists;
    assert!(kube::wait_for(&objects, WITHIN, |o| o.pv_lists >= passes + 3).await);
    let o = objects.lock().unwrap();
    let left: Vec<&str> = o.pvs.keys().map(String::as_str).collect();
    assert_eq!(left, ["live-bound", "other-driver"]);
    // One VolumeLost event per bound claim, on the claim, naming the PV and why.
    let mut events: Vec<(String, String, String)> = o
        .events
        .iter()
        .map(|e| {
            assert_eq!(e["involvedObject"]["kind"], "PersistentVolumeClaim");
            assert_eq!(e["reason"], "VolumeLost");
            assert_eq!(e["type"], "Warning");
            (
                e["involvedObject"]["name"].as_str().unwrap().to_string(),
                e["involvedObject"]["uid"].as_str().unwrap().to_string(),
                e["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    events.sort();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, "claim-gone-bound");
    assert_eq!(events[0].1, "uid-gone-bound");
    assert!(
        events[0].2.contains("node gone no longer exists"),
        "{}",
        events[0].2
    );
    assert_eq!(events[1].0, "claim-wiped");
    assert!(
        events[1].2.contains("node live started without it"),
        "{}",
        events[1].2
    );
    // Nothing but the released PVs, the lease and the events was written.
    for m in &o.mutations {
        let ok = m.path.contains("/leases")
            || m.path.ends_with("/events")
            || ["gone-bound", "gone-released", "wiped"]
                .iter()
                .any(|n| m.path.ends_with(&format!("/persistentvolumes/{n}")));
        assert!(ok, "unexpected {} {}", m.method, m.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_node_and_a_lost_mark_wait_out_the_grace() {
    let (api, objects) = kube::serve(cluster(
        &["live"],
        vec![
            pv("gone-bound", DRIVER, "sv-1", "gone", "Bound"),
            lost(
                pv("wiped", DRIVER, "sv-2", "live", "Bound"),
                "node live started without it",
            ),
        ],
    ))
    .await;
    let controller = Controller::start(&api, "c1", &["--node-gone-grace=1h"]);
    assert!(
        kube::wait_for(&objects, WITHIN, |o| o.pv_lists >= 5).await,
        "no passes; log:\n{}",
        controller.log()
    );
    let o = objects.lock().unwrap();
    assert!(o.pvs.contains_key("gone-bound") && o.pvs.contains_key("wiped"));
    assert!(o.events.is_empty());
    assert!(
        o.mutations.iter().all(|m| m.path.contains("/leases")),
        "{:?}",
        o.mutations
    );
}

/// Two replicas: every PV write and event comes from the replica that held the lease at that
/// moment; stopped, the holder gives the lease up and the other takes over without waiting
/// for it to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_acts_and_a_stopped_one_hands_over() {
    let (api, objects) = kube::serve(cluster(
        &["live"],
        vec![
            pv("gone-1", DRIVER, "sv-1", "gone", "Bound"),
            pv("live-1", DRIVER, "sv-2", "live", "Bound"),
        ],
    ))
    .await;
    // A lease far longer than the test: the other replica can only take over when the holder
    // gives the lease up.
    let long = ["--node-gone-grace=0", "--lease-duration=600s"];
    let mut first = Controller::start(&api, "c1", &long);
    let mut second = Controller::start(&api, "c2", &long);
    assert!(
        kube::wait_for(&objects, WITHIN, |o| !o.pvs.contains_key("gone-1")).await,
        "not released; logs:\n{}\n{}",
        first.log(),
        second.log()
    );
    let holder = {
        let o = objects.lock().unwrap();
        let holder = o.lease("sealvol-cleanup").unwrap()["spec"]["holderIdentity"]
            .as_str()
            .unwrap()
            .to_string();
        for m in o.mutations.iter().filter(|m| !m.path.contains("/leases")) {
            assert_eq!(
                m.lease_holder.as_deref(),
                Some(m.token.trim_start_matches("token-of-")),
                "{} {} by a replica that did not hold the lease",
                m.method,
                m.path
            );
        }
        holder
    };
    // Stop the holder: it gives the lease up, and the other takes it at once.
    let (stopped, other) = if holder == "c1" {
        (&mut first, "c2")
    } else {
        (&mut second, "c1")
    };
    assert!(stopped.terminate().success());
    assert!(
        kube::wait_for(&objects, WITHIN, |o| {
            o.lease("sealvol-cleanup").unwrap()["spec"]["holderIdentity"] == other
        })
        .await
    );
    let o = objects.lock().unwrap();
    let lease = o.lease("sealvol-cleanup").unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

/// A lease another replica holds and keeps renewing is respected; left to expire, it is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lease_is_waited_out() {
    let mut objects = cluster(
        &["live"],
        vec![pv("gone-1", DRIVER, "sv-1", "gone", "Bound")],
    );
    let held = |renewed: u64, version: u64| {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "sealvol-cleanup", "namespace": "sealvol", "resourceVersion": format!("held-{version}")},
            "spec": {"holderIdentity": "elsewhere", "leaseDurationSeconds": 1,
                     "renewTime": format!("2026-11-26T00:00:{:02}.000000Z", renewed % 60), "leaseTransitions": 4}
        })
    };
    objects.leases.insert("sealvol-cleanup".into(), held(0, 0));
    let (api, objects) = kube::serve(objects).await;
    let controller = Controller::start(&api, "c1", &["--node-gone-grace=0"]);
    // "elsewhere" renews every 300 ms for 4 s, well past its 1 s lease: nothing is taken.
    for i in 1..=13 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        objects
            .lock()
            .unwrap()
            .leases
            .insert("sealvol-cleanup".into(), held(i, i));
    }
    {
        let o = objects.lock().unwrap();
        assert!(o.pvs.contains_key("gone-1"), "acted under another's lease");
        assert_eq!(
            o.lease("sealvol-cleanup").unwrap()["spec"]["holderIdentity"],
            "elsewhere"
        );
        assert!(o.mutations.is_empty(), "{:?}", o.mutations);
    }
    // It stops renewing: the lease is taken and the PV released.
    assert!(
        kube::wait_for(&objects, WITHIN, |o| !o.pvs.contains_key("gone-1")).await,
        "the expired lease was not taken; log:\n{}",
        controller.log()
    );
    let o = objects.lock().unwrap();
    let lease = o.lease("sealvol-cleanup").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "c1");
    assert_eq!(lease["spec"]["leaseTransitions"], 5);
    for m in o.mutations.iter().filter(|m| !m.path.contains("/leases")) {
        assert_eq!(m.lease_holder.as_deref(), Some("c1"), "{m:?}");
    }
}

/// An API that fails to list nodes, or lists none, releases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_node_list_releases_nothing() {
    for (nodes, status) in [(vec!["live"], Some(500)), (vec![], None)] {
        let mut objects = cluster(&nodes, vec![pv("on-live", DRIVER, "sv-1", "live", "Bound")]);
        objects.nodes_status = status;
        let (api, objects) = kube::serve(objects).await;
        let controller = Controller::start(&api, "c1", &["--node-gone-grace=0"]);
        assert!(
            kube::wait_for(&objects, WITHIN, |o| o.pv_lists >= 5).await,
            "no passes; log:\n{}",
            controller.log()
        );
        let o = objects.lock().unwrap();
        assert!(o.pvs.contains_key("on-live"), "{status:?}");
        assert!(
            o.mutations.iter().all(|m| m.path.contains("/leases")),
            "{:?}",
            o.mutations
        );
        assert!(
            controller.log().contains("cleanup pass failed"),
            "{}",
            controller.log()
        );
    }
}

/// Starts a node plugin talking to the fake API, its pool on a tmpfs of its own (as a temp
/// disk is: another filesystem than the state directory's) unless `pool_on_state_fs`.
async fn node_with_api(
    api: &str,
    pool_on_state_fs: bool,
) -> (ScratchNode, CsiClient, tempfile::NamedTempFile) {
    require_root();
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "driver-sa-token").unwrap();
    let flags = [
        format!("--kube-api-url={api}"),
        format!("--kube-token-file={}", token.path().display()),
    ];
    let mut node = ScratchNode::new(&binary(), None)
        .unwrap()
        .with_args(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    if !pool_on_state_fs {
        node = node.pool_on_tmpfs(256 << 20).unwrap();
    }
    let c = node.start(&[]).await.expect("node plugin starts");
    (node, c, token)
}

fn lost_mark(o: &Objects, name: &str) -> Option<String> {
    o.pvs[name]["metadata"]["annotations"]["sealvol.io/lost"]
        .as_str()
        .map(str::to_string)
}

/// A node plugin whose pool lacks the volumes of its PVs marks exactly those PVs lost, first
/// one volume missing from a pool that holds others, then, after the disk is wiped, all; a
/// mark on a PV whose volume it holds is cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_marks_the_pvs_whose_volumes_its_pool_lost() {
    let (api, objects) = kube::serve(Objects::default()).await;
    let (mut node, mut c, _token) = node_with_api(&api, false).await;
    let here = node.node_id.clone();
    let kept = create(&mut c, "kept", 16 << 20).await;
    {
        let mut o = objects.lock().unwrap();
        for p in [
            pv("kept", DRIVER, &kept, &here, "Bound"),
            lost(
                pv("marked-by-mistake", DRIVER, &kept, &here, "Bound"),
                "earlier",
            ),
            pv(
                "never-here",
                DRIVER,
                "sv-0123456789abcdef0123456789abcdef",
                &here,
                "Bound",
            ),
            pv(
                "elsewhere",
                DRIVER,
                "sv-0123456789abcdef0123456789abcdee",
                "other-node",
                "Bound",
            ),
            pv(
                "released",
                DRIVER,
                "sv-0123456789abcdef0123456789abcded",
                &here,
                "Released",
            ),
            pv("other-driver", "other.csi.io", "sv-x", &here, "Bound"),
            pv("not-an-id", DRIVER, "../../etc/passwd", &here, "Bound"),
        ] {
            o.pvs
                .insert(p["metadata"]["name"].as_str().unwrap().to_string(), p);
        }
    }
    node.kill();
    drop(c);
    let c = node.start(&[]).await.expect("restart");
    assert!(
        kube::wait_for(&objects, WITHIN, |o| lost_mark(o, "never-here").is_some()
            && lost_mark(o, "marked-by-mistake").is_none())
        .await,
        "not marked; log:\n{}",
        node.log()
    );
    {
        let o = objects.lock().unwrap();
        let why = lost_mark(&o, "never-here").unwrap();
        assert!(why.contains(&here) && !why.contains("empty"), "{why}");
        for name in ["kept", "elsewhere", "released", "other-driver", "not-an-id"] {
            assert_eq!(lost_mark(&o, name), None, "{name} marked");
        }
    }
    assert!(
        node.log()
            .contains("volumes are missing from this node's pools")
    );

    // The disk is wiped: the pool comes back empty.
    node.kill();
    drop(c);
    for f in node.pool_files() {
        std::fs::remove_file(node.pool_dir.join(f)).unwrap();
    }
    let mut c = node.start(&[]).await.expect("restart");
    assert!(
        kube::wait_for(&objects, WITHIN, |o| lost_mark(o, "kept").is_some()).await,
        "not marked; log:\n{}",
        node.log()
    );
    let why = lost_mark(&objects.lock().unwrap(), "kept").unwrap();
    assert!(why.contains("were empty"), "{why}");
    assert!(node.log().contains("this node's pools are empty"));
    // The volume is gone; deleting it succeeds, as for any volume that no longer exists.
    delete(&mut c, &kept).await.expect("DeleteVolume");
    assert_clean(&node);
}

/// A directory pool on the state directory's filesystem may be an unmounted disk's mount point:
/// its missing volumes are reported, not marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_may_be_unmounted_marks_nothing() {
    // The PV is there before the node starts, so its one check at start sees it.
    let here = "scratch-node";
    let mut objects = Objects::default();
    let p = pv(
        "never-here",
        DRIVER,
        "sv-0123456789abcdef0123456789abcdef",
        here,
        "Bound",
    );
    objects.pvs.insert("never-here".into(), p);
    let (api, objects) = kube::serve(objects).await;
    let (node, _c, _token) = node_with_api(&api, true).await;
    assert_eq!(node.node_id, here, "the harness's node name");
    let deadline = std::time::Instant::now() + WITHIN;
    while !node.log().contains("checked this node's PVs") {
        assert!(
            std::time::Instant::now() < deadline,
            "no check; log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        node.log().contains("not marking them lost because"),
        "{}",
        node.log()
    );
    let o = objects.lock().unwrap();
    assert_eq!(lost_mark(&o, "never-here"), None);
    assert!(o.mutations.is_empty(), "{:?}", o.mutations);
}
