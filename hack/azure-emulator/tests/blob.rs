//! The Blob gateway with Azurite behind it, through Microsoft's own crates as the driver will
//! use them: azure_identity's ClientAssertionCredential (a pod token from the fake issuer
//! exchanged at the emulator's Entra) and azure_storage_blob 1.x. Writers write, readers read,
//! strangers get Azure's 403, anonymous callers Azure's 401, injected faults reach the client,
//! and no node process outlives its emulator. These tests need Azurite: `azurite-blob` on PATH
//! or in AZURITE_BLOB (`npm install -g azurite@3.37.0`); without it they fail, never skip.
#![allow(clippy::unwrap_used)]

mod common;
use common::{TENANT, http, sa_token};

use std::path::PathBuf;
use std::sync::Arc;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::{
    ClientMethodOptions, ClientOptions, FixedRetryOptions, RequestContent, RetryOptions, Transport,
    Url,
};
use azure_core::time::Duration;
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions,
};
use azure_storage_blob::models::{
    BlobClientGetPropertiesResultHeaders, BlockListType, BlockLookupList,
};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions, StorageError};
use sealvol_azure_emulator::{
    BlobAccess, Config, Emulator, FaultKind, FaultSpec, Options, RoleAssignment,
};
use serde_json::json;

const ACCOUNT: &str = "devstoreaccount1";
const WRITER: (&str, &str) = ("0b5e7c1a-1111-4111-8111-0000000000b1", "writer");
const READER: (&str, &str) = ("0b5e7c1a-1111-4111-8111-0000000000b2", "reader");
const NOBODY: (&str, &str) = ("0b5e7c1a-1111-4111-8111-0000000000b3", "nobody");
const WRITER_OID: &str = "7e1d0c2b-2222-4222-8222-0000000000b1";

/// Azurite's azurite-blob: AZURITE_BLOB, else the first on PATH.
fn azurite_blob() -> PathBuf {
    if let Some(p) = std::env::var_os("AZURITE_BLOB") {
        return p.into();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("azurite-blob"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "these tests need Azurite's azurite-blob on PATH or in AZURITE_BLOB: install it with `npm install -g azurite@3.37.0`"
            )
        })
}

fn identity(client: &str, sa: &str, n: u8) -> serde_json::Value {
    json!({"name": sa, "client_id": client,
           "object_id": format!("7e1d0c2b-2222-4222-8222-0000000000b{n}"),
           "federated_credentials": [{"name": "pod", "issuer": "{emulator}/issuers/cluster",
                                      "subject": format!("system:serviceaccount:default:{sa}")}]})
}

fn config() -> Config {
    let scope = format!("/storageAccounts/{ACCOUNT}/containers/backups");
    Config::parse(
        &json!({
            "tenants": [{"id": TENANT, "identities": [
                identity(WRITER.0, WRITER.1, 1),
                identity(READER.0, READER.1, 2),
                identity(NOBODY.0, NOBODY.1, 3),
            ]}],
            "issuers": ["cluster"],
            "storage_accounts": [
                {"name": ACCOUNT, "containers": ["backups", "other"]},
                {"name": "secondaccount", "containers": ["backups"]}
            ],
            "role_assignments": [
                {"principal": WRITER_OID, "role": "Storage Blob Data Contributor", "scope": scope},
                {"principal": "7e1d0c2b-2222-4222-8222-0000000000b2", "role": "Storage Blob Data Reader", "scope": scope}
            ]
        })
        .to_string(),
    )
    .unwrap()
}

async fn start() -> Emulator {
    Emulator::start(Options {
        config: config(),
        azurite: Some(azurite_blob()),
        ..Options::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The pod's service-account token, held in memory.
#[derive(Debug)]
struct PodToken(String);

#[async_trait::async_trait]
impl ClientAssertion for PodToken {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        Ok(self.0.clone())
    }
}

/// The emulator's CA, its Entra as the authority, and no automatic decompression (the SDK's
/// own transport has none; partitioned downloads need the bytes as sent). Retries are few and
/// quick: by default the SDK retries for over a minute.
fn client_options(emu: &Emulator, retries: u32) -> ClientOptions {
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(emu.ca_cert_pem.as_bytes()).unwrap()])
        .no_gzip()
        .no_deflate()
        .no_brotli()
        .no_zstd()
        .build()
        .unwrap();
    let mut cloud = CustomConfiguration::default();
    cloud.authority_host = emu.base_url.clone();
    ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        cloud: Some(Arc::new(CloudConfiguration::from(cloud))),
        retry: if retries == 0 {
            RetryOptions::none()
        } else {
            RetryOptions::fixed(FixedRetryOptions {
                delay: Duration::milliseconds(50),
                max_retries: retries,
                max_total_elapsed: Duration::seconds(10),
            })
        },
        ..ClientOptions::default()
    }
}

fn credential(emu: &Emulator, (client, sa): (&str, &str)) -> Arc<dyn TokenCredential> {
    ClientAssertionCredential::new(
        TENANT.to_string(),
        client.to_string(),
        PodToken(sa_token(emu, "cluster", sa)),
        Some(ClientAssertionCredentialOptions {
            client_options: client_options(emu, 0),
        }),
    )
    .unwrap()
}

/// A container client for `account`/`container` as `who` (None: no credential at all).
fn container_as(
    emu: &Emulator,
    account: &str,
    container: &str,
    who: Option<(&str, &str)>,
    retries: u32,
) -> BlobContainerClient {
    let url = format!("{}/{container}", emu.blob_url(account).unwrap());
    BlobContainerClient::new(
        Url::parse(&url).unwrap(),
        who.map(|w| credential(emu, w)),
        Some(BlobContainerClientOptions {
            client_options: client_options(emu, retries),
            ..Default::default()
        }),
    )
    .unwrap()
}

fn backups(emu: &Emulator, who: (&str, &str)) -> BlobContainerClient {
    container_as(emu, ACCOUNT, "backups", Some(who), 0)
}

/// The status and Storage error code of a failed call.
fn refusal(e: azure_core::Error) -> (u16, String) {
    let shown = e.to_string();
    let s = StorageError::try_from(e).unwrap_or_else(|e| panic!("not a Storage error: {e}"));
    let code = s.error_code.map(|c| c.to_string()).unwrap_or(shown);
    (u16::from(s.status_code), code)
}

#[tokio::test]
async fn writer_stages_commits_reads_and_deletes() {
    let emu = start().await;
    let container = backups(&emu, WRITER);
    let blob = container.blob_client("snapshots/pvc-1/0001");
    let block_blob = blob.block_blob_client();
    let blocks: [(&[u8], &[u8]); 2] =
        [(b"block-0000", b"first half, "), (b"block-0001", b"second")];
    for (id, data) in blocks {
        block_blob
            .stage_block(
                id,
                data.len() as u64,
                RequestContent::from(data.to_vec()),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("stage_block: {e}"));
    }
    let list = BlockLookupList {
        latest: Some(blocks.iter().map(|(id, _)| id.to_vec()).collect()),
        ..Default::default()
    };
    block_blob
        .commit_block_list(list.try_into().unwrap(), None)
        .await
        .unwrap_or_else(|e| panic!("commit_block_list: {e}"));
    let committed = block_blob
        .get_block_list(BlockListType::All, None)
        .await
        .unwrap_or_else(|e| panic!("get_block_list: {e}"))
        .into_model()
        .unwrap();
    let names: Vec<Vec<u8>> = committed
        .committed_blocks
        .unwrap_or_default()
        .into_iter()
        .filter_map(|b| b.name)
        .collect();
    assert_eq!(names, vec![b"block-0000".to_vec(), b"block-0001".to_vec()]);
    let body = blob
        .download(None)
        .await
        .unwrap_or_else(|e| panic!("download: {e}"))
        .body
        .collect()
        .await
        .unwrap();
    assert_eq!(&body[..], b"first half, second");

    let small = container.blob_client("manifest.json");
    small
        .upload(RequestContent::from(b"{\"blocks\": 2}".to_vec()), None)
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    let props = small
        .get_properties(None)
        .await
        .unwrap_or_else(|e| panic!("get_properties: {e}"));
    // A HEAD answer's Content-Length is the blob's size, through the gateway too.
    assert_eq!(props.content_length().unwrap(), Some(13));
    small
        .delete(None)
        .await
        .unwrap_or_else(|e| panic!("delete: {e}"));
    let (status, code) = refusal(small.download(None).await.unwrap_err());
    assert_eq!((status, code.as_str()), (404, "BlobNotFound"));

    assert_eq!(emu.count("blob.put_block", Some(201)), 2);
    assert_eq!(emu.count("blob.put_block_list", Some(201)), 1);
    assert_eq!(emu.count("blob.get_block_list", Some(200)), 1);
    assert_eq!(emu.count("blob.put", Some(201)), 1);
    assert_eq!(emu.count("blob.delete", Some(202)), 1);
    assert!(emu.count("blob.get", None) >= 2);
    // One token exchange served every call: the SDK caches the storage token.
    assert_eq!(emu.count("entra.token", Some(200)), 1);
}

#[tokio::test]
async fn large_blobs_pass_through_in_pieces() {
    let emu = start().await;
    let blob = backups(&emu, WRITER).blob_client("big");
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    blob.upload(RequestContent::from(data.clone()), None)
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    let got = blob
        .download(None)
        .await
        .unwrap_or_else(|e| panic!("download: {e}"))
        .body
        .collect()
        .await
        .unwrap();
    assert!(got[..] == data[..], "the blob came back changed");
    // The SDK splits both ways: blocks up, ranges down.
    assert!(emu.count("blob.put_block", Some(201)) > 1);
    assert!(emu.count("blob.get", Some(206)) > 1);
}

#[tokio::test]
async fn readers_read_and_others_are_refused() {
    let emu = start().await;
    backups(&emu, WRITER)
        .blob_client("b")
        .upload(RequestContent::from(b"data".to_vec()), None)
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));

    let reader = backups(&emu, READER);
    let got = reader.blob_client("b").download(None).await.unwrap();
    assert_eq!(&got.body.collect().await.unwrap()[..], b"data");
    let denied = |e| {
        let (status, code) = refusal(e);
        assert_eq!(
            (status, code.as_str()),
            (403, "AuthorizationPermissionMismatch")
        );
    };
    denied(
        reader
            .blob_client("b2")
            .upload(RequestContent::from(b"x".to_vec()), None)
            .await
            .unwrap_err(),
    );
    denied(reader.blob_client("b").delete(None).await.unwrap_err());
    denied(
        reader
            .blob_client("b")
            .block_blob_client()
            .stage_block(b"id", 1, RequestContent::from(b"x".to_vec()), None)
            .await
            .unwrap_err(),
    );

    // No storage role at all: not even a read.
    denied(
        backups(&emu, NOBODY)
            .blob_client("b")
            .download(None)
            .await
            .unwrap_err(),
    );
    // The writer's role is on one container: not another container of the account, not the
    // same container name in another account, not creating containers (the account's scope).
    for (account, container) in [(ACCOUNT, "other"), ("secondaccount", "backups")] {
        denied(
            container_as(&emu, account, container, Some(WRITER), 0)
                .blob_client("b")
                .upload(RequestContent::from(b"x".to_vec()), None)
                .await
                .unwrap_err(),
        );
    }
    denied(
        container_as(&emu, ACCOUNT, "new-container", Some(WRITER), 0)
            .create(None)
            .await
            .unwrap_err(),
    );
    assert!(emu.blob_allowed(WRITER_OID, ACCOUNT, Some("backups"), BlobAccess::Delete));
    assert!(!emu.blob_allowed(WRITER_OID, ACCOUNT, None, BlobAccess::Write));

    // A role assigned at run time takes effect on the next call.
    emu.assign_role(RoleAssignment {
        principal: WRITER_OID.into(),
        role: "Storage Blob Data Contributor".into(),
        scope: "/storageAccounts/secondaccount".into(),
    });
    container_as(&emu, "secondaccount", "backups", Some(WRITER), 0)
        .blob_client("b")
        .upload(RequestContent::from(b"x".to_vec()), None)
        .await
        .unwrap_or_else(|e| panic!("upload after the assignment: {e}"));
}

#[tokio::test]
async fn requests_without_a_valid_storage_token_get_401() {
    let emu = start().await;
    let anonymous = container_as(&emu, ACCOUNT, "backups", None, 0);
    let (status, code) = refusal(anonymous.blob_client("b").download(None).await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (401, "NoAuthenticationInformation")
    );

    // As Azure Storage answers: the error XML, its code in a header, a Bearer challenge.
    let url = format!("{}/backups/b", emu.blob_url(ACCOUNT).unwrap());
    let vault_token = common::token_for(&emu, WRITER.0, WRITER.1, "https://vault.azure.net").await;
    let r = http(&emu)
        .get(&url)
        .bearer_auth(&vault_token)
        .header("x-ms-version", "2026-04-06")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(header("x-ms-error-code"), "InvalidAuthenticationInfo");
    assert_eq!(
        header("www-authenticate"),
        format!(
            "Bearer authorization_uri=https://login.microsoftonline.com/{TENANT}/oauth2/authorize resource_id=https://storage.azure.com"
        )
    );
    let body = r.text().await.unwrap();
    assert!(
        body.starts_with(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>InvalidAuthenticationInfo</Code><Message>Server failed to authenticate the request."
        ),
        "{body}"
    );
    assert!(body.contains("Audience validation failed"), "{body}");

    // A token with Storage's audience but not signed by this Entra: Azurite alone would take
    // it (basic OAuth checks no signature); the gateway does not.
    let (_, mut claims) = sealvol_azure_emulator::crypto::peek_jwt(&vault_token).unwrap();
    claims["aud"] = json!("https://storage.azure.com");
    let forged = format!(
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.{}.c2lnbmF0dXJl",
        sealvol_azure_emulator::crypto::b64url(claims.to_string().as_bytes())
    );
    let r = http(&emu)
        .get(&url)
        .bearer_auth(&forged)
        .header("x-ms-version", "2026-04-06")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("Signature validation failed")
    );
    assert_eq!(emu.count("blob.get", Some(401)), 3);
}

#[tokio::test]
async fn injected_faults_reach_the_client() {
    let emu = start().await;
    let busy = |count| FaultSpec {
        route: "blob.put_block".into(),
        kind: FaultKind::Status {
            status: 503,
            retry_after: Some(1),
        },
        count: Some(count),
        duration_ms: None,
        client_id: None,
    };
    let stage = |c: &BlobContainerClient| {
        let b = c.blob_client("f").block_blob_client();
        async move {
            b.stage_block(b"id-1", 3, RequestContent::from(b"abc".to_vec()), None)
                .await
        }
    };
    // Without retries the client sees Storage's 503 ServerBusy.
    emu.inject_fault(busy(1));
    let (status, code) = refusal(stage(&backups(&emu, WRITER)).await.unwrap_err());
    assert_eq!((status, code.as_str()), (503, "ServerBusy"));
    // With retries the SDK tries again (after Retry-After) and succeeds.
    emu.inject_fault(busy(1));
    let retrying = container_as(&emu, ACCOUNT, "backups", Some(WRITER), 2);
    stage(&retrying)
        .await
        .unwrap_or_else(|e| panic!("stage_block with retries: {e}"));
    assert_eq!(emu.count("blob.put_block", Some(503)), 2);
    assert_eq!(emu.count("blob.put_block", Some(201)), 1);

    // A dropped connection is an I/O error, not an HTTP answer.
    emu.inject_fault(FaultSpec {
        kind: FaultKind::Drop,
        ..busy(1)
    });
    let e = stage(&backups(&emu, WRITER)).await.unwrap_err();
    assert_eq!(e.http_status(), None, "{e}");
}

#[tokio::test]
async fn azurite_is_stopped_with_the_emulator() {
    let emu = start().await;
    let azurite = emu.azurite_url().unwrap();
    let port: u16 = azurite.rsplit(':').next().unwrap().parse().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(emu);
    // Drop kills and waits: the port is closed at once.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "Azurite at {azurite} outlived its emulator"
    );
}

#[tokio::test]
async fn storage_accounts_need_azurite_and_valid_names() {
    let e = Emulator::start(Options {
        config: config(),
        ..Options::default()
    })
    .await
    .err()
    .unwrap();
    assert!(
        e.contains("azurite-blob") && e.contains("npm install -g azurite@3.37.0"),
        "{e}"
    );
    let mut bad = config();
    bad.storage_accounts[0].name = "Not_An_Account".into();
    let e = Emulator::start(Options {
        config: bad,
        azurite: Some(azurite_blob()),
        ..Options::default()
    })
    .await
    .err()
    .unwrap();
    assert!(e.contains("3 to 24 lowercase letters and digits"), "{e}");
}

/// `sealvol-azure-emulator serve --azurite` with Azurite's temporary directory in `tmp`: the
/// process, its first three stdout lines, and its log so far.
fn serve(tmp: &std::path::Path) -> (std::process::Child, Vec<String>, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let config_path = tmp.join("config.json");
    std::fs::write(&config_path, serde_json::to_string(&config()).unwrap()).unwrap();
    let log = tmp.join("emulator.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealvol-azure-emulator"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .arg("--azurite")
        .arg(azurite_blob())
        .env("EMULATOR_LOG", "info")
        .env("TMPDIR", tmp)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let lines = (0..3).map(|_| lines.next().unwrap().unwrap()).collect();
    (child, lines, std::fs::read_to_string(&log).unwrap())
}

/// The port of the first `https://127.0.0.1:PORT` in `text`.
fn port_in(text: &str) -> u16 {
    let rest = text.split("https://127.0.0.1:").nth(1).unwrap();
    rest.split(['/', ' ', '\n'])
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn wait_closed(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "Azurite (port {port}) outlived the emulator's process"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn serve_prints_blob_urls_and_azurite_dies_with_it() {
    let killed = tempfile::tempdir().unwrap();
    let (mut child, lines, log) = serve(killed.path());
    // Killed outright: no Drop runs, the kernel's parent-death signal must end Azurite.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(lines[0].starts_with("https://127.0.0.1:"), "{}", lines[0]);
    let gw = port_in(&lines[1]);
    assert_eq!(
        lines[1..],
        [
            format!("blob devstoreaccount1 https://127.0.0.1:{gw}/devstoreaccount1"),
            format!("blob secondaccount https://127.0.0.1:{gw}/secondaccount"),
        ]
    );
    wait_closed(port_in(log.split("azurite=").nth(1).unwrap()));

    // SIGTERM: the emulator stops in order and leaves no temporary directory behind.
    let termed = tempfile::tempdir().unwrap();
    let (mut child, _, log) = serve(termed.path());
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();
    wait_closed(port_in(log.split("azurite=").nth(1).unwrap()));
    let left: Vec<_> = std::fs::read_dir(termed.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sealvol-azurite-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
