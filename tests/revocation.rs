//! Continuous authorization: on kubelet's republish, a publication whose last authorization is
//! older than --reauthorize-interval is re-authorized with a real Key Vault call; a revoked
//! identity locks the volume, a restored one unlocks it with its data intact, and transient
//! failures lock only after --revoke-grace.
#![allow(clippy::unwrap_used)]

mod common;
use common::azure::*;
use common::*;

use std::path::Path;
use std::time::Duration;

use sealvol_azure_emulator::{FaultKind, FaultSpec, FederatedCredential, RoleAssignment};

struct Published {
    node: ScratchNode,
    c: CsiClient,
    id: String,
    target: String,
}

impl Published {
    async fn start(azure: &Azure, flags: &[&str], extra_params: &[(&str, &str)]) -> Published {
        let (node, mut c) = node_with(azure, flags).await;
        let mut params = azure.params("keyvault-key");
        params.extend(
            extra_params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let refs: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let id = create_with(&mut c, "pvc-reauth", 32 * MIB, &refs).await;
        c.node.node_stage_volume(node.stage(&id)).await.unwrap();
        c.node
            .node_publish_volume(publish_as(&node, &id, "pod", &azure.token("app"), "app"))
            .await
            .unwrap();
        let target = node.target_path("pod", &id);
        std::fs::write(
            format!("{target}/closed-file"),
            b"written before the revocation",
        )
        .unwrap();
        nix::unistd::sync();
        Published {
            node,
            c,
            id,
            target,
        }
    }

    /// kubelet's republish, with a fresh token as kubelet's would be.
    async fn republish(&mut self, azure: &Azure) -> Result<(), tonic::Status> {
        self.c
            .node
            .node_publish_volume(publish_as(
                &self.node,
                &self.id,
                "pod",
                &azure.token("app"),
                "app",
            ))
            .await
            .map(|_| ())
    }

    fn key_present(&self) -> bool {
        sealvol::harness::keys::key_present(
            Path::new(&self.node.staging_path(&self.id)),
            &identifier(&self.node, &self.id),
        )
        .unwrap()
    }

    fn assert_locked(&self) {
        assert!(!self.key_present(), "the key is still in the kernel");
        let read = std::fs::read(format!("{}/closed-file", self.target)).unwrap_err();
        assert_eq!(
            read.raw_os_error(),
            Some(libc::ENOKEY),
            "reading a file that was not open: {read}"
        );
        let create = std::fs::write(format!("{}/new-file", self.target), b"x").unwrap_err();
        assert_eq!(
            create.raw_os_error(),
            Some(libc::ENOKEY),
            "creating a file: {create}"
        );
    }

    fn assert_usable(&self) {
        assert!(self.key_present());
        assert_eq!(
            std::fs::read(format!("{}/closed-file", self.target)).unwrap(),
            b"written before the revocation"
        );
    }

    async fn finish(mut self) {
        self.c
            .node
            .node_unpublish_volume(self.node.unpublish(&self.id, "pod"))
            .await
            .unwrap();
        self.c
            .node
            .node_unstage_volume(self.node.unstage(&self.id))
            .await
            .unwrap();
        delete(&mut self.c, &self.id).await.unwrap();
        assert_clean(&self.node);
    }
}

fn app_role() -> RoleAssignment {
    RoleAssignment {
        principal: APP_OID.into(),
        role: "Key Vault Crypto Service Encryption User".into(),
        scope: "/vaults/kv/keys/kek".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_role_locks_and_restoring_it_unlocks() {
    let azure = Azure::start().await;
    let mut v = Published::start(&azure, &["--reauthorize-interval=0"], &[]).await;
    v.republish(&azure).await.unwrap();
    v.assert_usable();
    assert!(azure.emu.revoke_role(&app_role()));
    let s = v.republish(&azure).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    v.assert_locked();
    assert!(is_mounted(&v.target), "onRevoke lock keeps the mount");
    // Still refused while revoked.
    assert_eq!(
        v.republish(&azure).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    azure.emu.assign_role(app_role());
    v.republish(&azure).await.unwrap();
    v.assert_usable();
    std::fs::write(format!("{}/after", v.target), b"unlocked").unwrap();
    let log = v.node.log();
    for event in ["\"lock\"", "\"unlock\"", "\"reauthorize\""] {
        assert!(log.contains(event), "no audit line for {event}");
    }
    v.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_the_key_or_deleting_the_federated_credential_locks() {
    let azure = Azure::start().await;
    let mut v = Published::start(&azure, &["--reauthorize-interval=0"], &[]).await;
    let set_enabled = |enabled: bool| {
        let mut state = azure.emu.shared.lock();
        for k in state
            .vaults
            .get_mut("kv")
            .unwrap()
            .keys
            .get_mut("kek")
            .unwrap()
        {
            k.enabled = enabled;
        }
    };
    set_enabled(false);
    assert_eq!(
        v.republish(&azure).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    v.assert_locked();
    set_enabled(true);
    v.republish(&azure).await.unwrap();
    v.assert_usable();

    // The federated credential goes: Entra refuses the exchange (a cached access token would
    // not notice, so re-authorization always exchanges afresh).
    assert!(
        azure
            .emu
            .shared
            .lock()
            .remove_federated_credential(APP, "app")
    );
    assert_eq!(
        v.republish(&azure).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    v.assert_locked();
    azure.emu.shared.lock().add_federated_credential(
        APP,
        FederatedCredential {
            name: "app".into(),
            issuer: format!("{}/issuers/cluster", azure.emu.base_url),
            subject: "system:serviceaccount:default:app".into(),
            audiences: vec![AUD.into()],
        },
    );
    v.republish(&azure).await.unwrap();
    v.assert_usable();
    v.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_lock_only_after_the_grace() {
    let azure = Azure::start().await;
    let mut v = Published::start(
        &azure,
        &["--reauthorize-interval=0", "--revoke-grace=3s"],
        &[],
    )
    .await;
    azure.emu.inject_fault(FaultSpec {
        client_id: None,
        route: "keyvault.unwrap".into(),
        kind: FaultKind::Status {
            status: 503,
            retry_after: None,
        },
        count: None,
        duration_ms: None,
    });
    let s = v.republish(&azure).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert!(s.message().contains("stays usable"), "{}", s.message());
    v.assert_usable();
    // An outage shorter than the grace ends: nothing was locked.
    azure.emu.clear_faults();
    v.republish(&azure).await.unwrap();
    v.assert_usable();
    // A longer one locks.
    azure.emu.inject_fault(FaultSpec {
        client_id: None,
        route: "keyvault.unwrap".into(),
        kind: FaultKind::Status {
            status: 503,
            retry_after: None,
        },
        count: None,
        duration_ms: None,
    });
    assert_eq!(
        v.republish(&azure).await.unwrap_err().code(),
        Code::Unavailable
    );
    v.assert_usable();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = v.republish(&azure).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert!(s.message().contains("locked"), "{}", s.message());
    v.assert_locked();
    azure.emu.clear_faults();
    v.republish(&azure).await.unwrap();
    v.assert_usable();
    v.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interval_is_honoured() {
    let azure = Azure::start().await;
    let mut v = Published::start(&azure, &["--reauthorize-interval=2s"], &[]).await;
    let unwraps = azure.unwraps();
    for _ in 0..5 {
        v.republish(&azure).await.unwrap();
    }
    assert_eq!(azure.unwraps(), unwraps, "not due: no Key Vault call");
    // Not due, so a revocation is not seen yet...
    assert!(azure.emu.revoke_role(&app_role()));
    v.republish(&azure).await.unwrap();
    v.assert_usable();
    // ...until the interval has passed.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        v.republish(&azure).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        azure.emu.count("keyvault.unwrap", Some(403)),
        1,
        "exactly one Key Vault call when due"
    );
    v.assert_locked();
    azure.emu.assign_role(app_role());
    v.republish(&azure).await.unwrap();
    v.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_unmount_is_refused_with_the_reason() {
    let azure = Azure::start().await;
    let (_node, mut c) = node_for(&azure).await;
    let mut params = azure.params("keyvault-key");
    params.push(("onRevoke".into(), "lock-and-unmount".into()));
    let refs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let s = refused(
        c.controller
            .create_volume(requests::create("pvc-unmount", 32 * MIB, &refs))
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("onRevoke"), "{}", s.message());
    assert!(s.message().contains("evict"), "{}", s.message());
}

fn entra_fault(status: u16, error: &str, code: u32) -> FaultSpec {
    FaultSpec {
        client_id: Some(APP.into()),
        route: "entra.token".into(),
        kind: FaultKind::EntraError {
            status,
            error: error.into(),
            code,
            description: None,
        },
        count: None,
        duration_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_transient_errors_stay_within_the_grace_and_refusals_lock_at_once() {
    let azure = Azure::start().await;
    let mut v = Published::start(
        &azure,
        &["--reauthorize-interval=0", "--revoke-grace=1h"],
        &[],
    )
    .await;
    // Entra's transient errors carry AADSTS codes too: they are not refusals.
    for (status, error, code) in [
        (503, "temporarily_unavailable", 90033),
        (500, "server_error", 90006),
        (429, "temporarily_unavailable", 90033),
        (400, "invalid_request", 90006),
    ] {
        azure.emu.inject_fault(entra_fault(status, error, code));
        let s = v.republish(&azure).await.unwrap_err();
        assert_eq!(
            s.code(),
            Code::Unavailable,
            "{status} AADSTS{code}: {}",
            s.message()
        );
        assert!(s.message().contains("stays usable"), "{}", s.message());
        v.assert_usable();
        azure.emu.clear_faults();
        v.republish(&azure).await.unwrap();
    }
    // A definitive refusal locks at once, whatever the grace.
    azure
        .emu
        .inject_fault(entra_fault(400, "invalid_client", 70021));
    let s = v.republish(&azure).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    v.assert_locked();
    azure.emu.clear_faults();
    v.republish(&azure).await.unwrap();
    v.assert_usable();
    v.finish().await;
}
