//! Backups of snapshots to Azure Blob storage, written and read with the driver's own workload
//! identity (the DaemonSet's ServiceAccount token, exchanged at Entra ID), through Microsoft's
//! `azure_storage_blob` crate.
//!
//! That identity needs a Storage Blob Data role on the backup container and no Key Vault role:
//! what it moves is a snapshot file, the ciphertext of an encrypted volume and a header holding
//! the DEK wrapped by a KEK it cannot use, so it can store and fetch backups but read nothing in
//! them. A backup of snapshot `ss-X` is two blobs in the container: `ss-X/data` (the file's
//! written extents, in blocks) and `ss-X/manifest.json` (extents and block digests, see
//! `layout`), uploaded last, so a backup without its manifest is incomplete and never restored.
//! Uploads resume: blocks already staged under the same id (index and SHA-256) are not sent
//! again. The committed block list is read back and compared before the manifest goes up, and
//! every downloaded block is checked against its digest.

mod layout;

pub(crate) use layout::Manifest;

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::{ClientOptions, RequestContent, Url};
use azure_identity::{
    ClientAssertionCredentialOptions, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use azure_storage_blob::models::{BlobClientDownloadOptions, BlockListType, BlockLookupList};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions, BlockBlobClient};
use tokio::task::JoinSet;

use crate::sys;

const DATA_BLOB: &str = "data";
const MANIFEST_BLOB: &str = "manifest.json";
/// Block requests in flight at once, each holding one block in memory.
const IN_FLIGHT: usize = 4;
/// A manifest larger than this is not read (one of a 1 TiB file is well under 1 MiB).
const MAX_MANIFEST_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum BackupError {
    /// The container or Entra ID refused the driver's identity, or the container is missing:
    /// an operator must act.
    #[error("{0}")]
    Refused(String),
    /// Blob storage or Entra ID could not be reached or failed: retrying may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// What Blob storage holds is not what the manifest says.
    #[error("{0}")]
    Corrupt(String),
    /// Stopped on request (the snapshot is being deleted).
    #[error("the upload was stopped")]
    Stopped,
    /// The backup is gone (deleted while it was read).
    #[error("{0}")]
    Gone(String),
    #[error(transparent)]
    Local(#[from] sys::SysError),
}

/// The node's backup settings (`--backup-url` and the driver's identity).
#[derive(Debug, Clone, Default)]
pub struct BackupConfig {
    /// The containers backups may go to, `https://ACCOUNT.blob.core.windows.net/CONTAINER`
    /// (or path-style, `https://HOST/ACCOUNT/CONTAINER`). Empty: backups are off.
    pub urls: Vec<String>,
    /// The driver's own identity: client id, tenant, and its projected ServiceAccount token.
    pub client_id: Option<String>,
    pub tenant_id: Option<String>,
    pub token_file: PathBuf,
}

/// The backup containers this node may use, with the driver's identity.
pub(crate) struct BackupStore {
    containers: Vec<(String, Arc<BlobContainerClient>)>,
}

/// A snapshot file to upload, open (so that the caller can tell afterwards whether the file at
/// its path is still this one).
pub(crate) struct SnapshotFile<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: &'a Path,
    pub(crate) id: &'a str,
    pub(crate) source_volume_id: &'a str,
    pub(crate) created_unix: u64,
    pub(crate) size_bytes: u64,
}

/// What an upload did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Uploaded {
    pub(crate) blocks: usize,
    /// Blocks found staged by an earlier attempt and not sent again.
    pub(crate) reused: usize,
    pub(crate) data_bytes: u64,
}

/// Checks a `--backup-url` value and returns it without a trailing slash.
pub(crate) fn normalize_url(raw: &str) -> Result<String, String> {
    let url =
        Url::parse(raw.trim_end_matches('/')).map_err(|e| format!("{raw:?} is not a URL ({e})"))?;
    let segments: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
    let ok = url.scheme() == "https"
        && url.host_str().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none()
        && matches!(segments.len(), 1 | 2)
        && segments.iter().all(|s| valid_segment(s));
    if !ok {
        return Err(format!(
            "{raw:?} is not a container URL: expected https://ACCOUNT.blob.core.windows.net/CONTAINER (or https://HOST/ACCOUNT/CONTAINER), without a query"
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// A container (or path-style account) name: 3 to 63 lowercase letters, digits and dashes.
fn valid_segment(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl BackupStore {
    /// The store for `config`, or None when no container is configured. `options` carries the
    /// HTTP transport (trust roots) and retries; `authority_host` is Entra ID's.
    pub(crate) fn new(
        config: &BackupConfig,
        options: ClientOptions,
        authority_host: &str,
    ) -> Result<Option<BackupStore>, String> {
        if config.urls.is_empty() {
            return Ok(None);
        }
        let client_id = config.client_id.clone().ok_or(
            "--backup-url needs the driver's own identity: --backup-client-id (or AZURE_CLIENT_ID)",
        )?;
        let tenant_id = config.tenant_id.clone().ok_or(
            "--backup-url needs --tenant-id (or AZURE_TENANT_ID) for the driver's identity",
        )?;
        let mut credential_options = options.clone();
        let mut cloud = azure_core::cloud::CustomConfiguration::default();
        cloud.authority_host = authority_host.trim_end_matches('/').to_string();
        credential_options.cloud =
            Some(Arc::new(azure_core::cloud::CloudConfiguration::from(cloud)));
        let credential: Arc<dyn TokenCredential> =
            WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions {
                    client_options: credential_options,
                },
                client_id: Some(client_id),
                tenant_id: Some(tenant_id),
                token_file_path: Some(config.token_file.clone()),
            }))
            .map_err(|e| format!("the driver's identity: {e}"))?;
        let mut containers = Vec::new();
        for raw in &config.urls {
            let url = normalize_url(raw).map_err(|e| format!("--backup-url: {e}"))?;
            let parsed = Url::parse(&url).map_err(|e| e.to_string())?;
            let client = BlobContainerClient::new(
                parsed,
                Some(Arc::clone(&credential)),
                Some(BlobContainerClientOptions {
                    client_options: options.clone(),
                    ..BlobContainerClientOptions::default()
                }),
            )
            .map_err(|e| format!("--backup-url {url}: {e}"))?;
            containers.push((url, Arc::new(client)));
        }
        Ok(Some(BackupStore { containers }))
    }

    /// The configured container `raw` names (after normalizing), or what is accepted.
    pub(crate) fn allowed(&self, raw: &str) -> Result<String, String> {
        let url = normalize_url(raw)?;
        if self.containers.iter().any(|(u, _)| *u == url) {
            return Ok(url);
        }
        Err(format!(
            "{url} is not a backup container of this node; --backup-url allows: {}",
            self.urls().join(", ")
        ))
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.containers.iter().map(|(u, _)| u.clone()).collect()
    }

    fn container(&self, url: &str) -> Result<&Arc<BlobContainerClient>, BackupError> {
        self.containers
            .iter()
            .find(|(u, _)| u == url)
            .map(|(_, c)| c)
            .ok_or_else(|| {
                BackupError::Refused(format!(
                    "{url} is no longer a backup container of this node (--backup-url)"
                ))
            })
    }

    /// Uploads `snap`'s data to the container at `url`, resuming an earlier attempt, commits
    /// and verifies it, and returns the manifest to put with `put_manifest` (which makes the
    /// backup complete). Stops between blocks once `stop` is set. `staged` is called after each
    /// block the container took.
    pub(crate) async fn upload_data(
        &self,
        url: &str,
        snap: &SnapshotFile<'_>,
        stop: &AtomicBool,
        staged: &(dyn Fn() + Sync),
    ) -> Result<(Manifest, Uploaded), BackupError> {
        let container = self.container(url)?;
        let file = snap.file;
        let file_bytes = file
            .metadata()
            .map_err(|e| sys::SysError::io("stat", snap.path, e))?
            .len();
        let extents: Vec<(u64, u64)> = sys::written_extents(file, snap.path)?
            .into_iter()
            .filter(|&(offset, _)| offset < file_bytes)
            .map(|(offset, len)| (offset, len.min(file_bytes - offset)))
            .collect();
        let data_bytes: u64 = extents.iter().map(|e| e.1).sum();
        let block_bytes = layout::block_bytes_for(data_bytes);
        let count = data_bytes.div_ceil(block_bytes);
        let data = Arc::new(
            container
                .blob_client(&blob_name(snap.id, DATA_BLOB))
                .block_blob_client(),
        );
        let already = staged_blocks(&data, url, snap.id).await?;
        let mut ids = Vec::with_capacity(count as usize);
        let mut digests = Vec::with_capacity(count as usize);
        let mut reused = 0;
        let mut inflight: JoinSet<Result<(), BackupError>> = JoinSet::new();
        for index in 0..count {
            if stop.load(Ordering::Relaxed) {
                // Blocks already sent land before the caller deletes what was staged.
                while inflight.join_next().await.is_some() {}
                return Err(BackupError::Stopped);
            }
            let block = read_block(file, snap.path, &extents, block_bytes, index)?;
            let digest = layout::sha256(&block);
            let id = layout::block_id(index, &digest);
            digests.push(layout::hex(&digest));
            ids.push(id.clone());
            if already.contains(&(id.clone(), block.len() as u64)) {
                reused += 1;
                continue;
            }
            while inflight.len() >= IN_FLIGHT {
                join_one(&mut inflight).await?;
                staged();
            }
            let data = Arc::clone(&data);
            let url = url.to_string();
            inflight.spawn(async move {
                let len = block.len() as u64;
                data.stage_block(&id, len, RequestContent::from(block), None)
                    .await
                    .map(drop)
                    .map_err(|e| classify(e, &url, "staging a block in"))
            });
        }
        while !inflight.is_empty() {
            join_one(&mut inflight).await?;
            staged();
        }
        if stop.load(Ordering::Relaxed) {
            return Err(BackupError::Stopped);
        }
        let list = BlockLookupList {
            latest: Some(ids.clone()),
            ..BlockLookupList::default()
        };
        data.commit_block_list(
            list.try_into()
                .map_err(|e| BackupError::Unavailable(format!("the block list: {e}")))?,
            None,
        )
        .await
        .map_err(|e| classify(e, url, "committing the blocks in"))?;
        verify_committed(&data, url, snap.id, &ids, data_bytes, block_bytes).await?;
        let manifest = Manifest {
            format: layout::MANIFEST_FORMAT,
            snapshot_id: snap.id.to_string(),
            source_volume_id: snap.source_volume_id.to_string(),
            created_unix: snap.created_unix,
            size_bytes: snap.size_bytes,
            file_bytes,
            block_bytes,
            extents,
            blocks: digests,
        };
        let uploaded = Uploaded {
            blocks: count as usize,
            reused,
            data_bytes,
        };
        Ok((manifest, uploaded))
    }

    /// Puts the manifest of an uploaded backup: from now on it is complete.
    pub(crate) async fn put_manifest(
        &self,
        url: &str,
        manifest: &Manifest,
    ) -> Result<(), BackupError> {
        let text = serde_json::to_vec(manifest)
            .map_err(|e| BackupError::Unavailable(format!("the manifest: {e}")))?;
        self.container(url)?
            .blob_client(&blob_name(&manifest.snapshot_id, MANIFEST_BLOB))
            .upload(RequestContent::from(text), None)
            .await
            .map_err(|e| classify(e, url, "writing the manifest to"))?;
        Ok(())
    }

    /// The manifest of snapshot `id` in the container at `url`; None when there is none (no
    /// backup, or one whose upload did not finish).
    pub(crate) async fn manifest(
        &self,
        url: &str,
        id: &str,
    ) -> Result<Option<Manifest>, BackupError> {
        let container = self.container(url)?;
        let blob = container.blob_client(&blob_name(id, MANIFEST_BLOB));
        let response = match blob.download(None).await {
            Ok(r) => r,
            Err(e) if storage_code(&e).as_deref() == Some("BlobNotFound") => return Ok(None),
            Err(e) => return Err(classify(e, url, "reading a manifest in")),
        };
        if response
            .properties
            .content_length
            .is_none_or(|n| n > MAX_MANIFEST_BYTES as u64)
        {
            return Err(BackupError::Corrupt(format!(
                "the manifest of {id} in {url} is larger than {MAX_MANIFEST_BYTES} bytes (or of no stated length)"
            )));
        }
        let bytes = response
            .body
            .collect()
            .await
            .map_err(|e| classify(e, url, "reading a manifest in"))?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            BackupError::Corrupt(format!(
                "the manifest of {id} in {url} is not readable: {e}"
            ))
        })?;
        manifest.check(id).map_err(|e| {
            BackupError::Corrupt(format!("the manifest of {id} in {url} is not usable: {e}"))
        })?;
        Ok(Some(manifest))
    }

    /// The first configured container holding a complete backup of `id`, and its manifest. A
    /// container that fails does not hide the others; its error is returned when none has it.
    pub(crate) async fn find(&self, id: &str) -> Result<Option<(String, Manifest)>, BackupError> {
        let mut failed = None;
        for (url, _) in &self.containers {
            match self.manifest(url, id).await {
                Ok(Some(m)) => return Ok(Some((url.clone(), m))),
                Ok(None) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(None), Err)
    }

    /// Writes `blocks` of the backup at `url` described by `manifest` into `to` (at least
    /// `manifest.file_bytes` long), checking each against its digest.
    pub(crate) async fn download(
        &self,
        url: &str,
        manifest: &Manifest,
        to: &File,
        to_path: &Path,
        blocks: std::ops::Range<u64>,
    ) -> Result<(), BackupError> {
        let container = self.container(url)?;
        let blob = Arc::new(container.blob_client(&blob_name(&manifest.snapshot_id, DATA_BLOB)));
        let data_bytes = manifest.data_bytes();
        let mut inflight: JoinSet<Result<(u64, Vec<u8>), BackupError>> = JoinSet::new();
        let write = |index: u64, block: Vec<u8>| -> Result<(), BackupError> {
            let digest = layout::hex(&layout::sha256(&block));
            if manifest.blocks.get(index as usize) != Some(&digest) {
                return Err(BackupError::Corrupt(format!(
                    "block {index} of {} in {url} does not match its digest in the manifest",
                    manifest.snapshot_id
                )));
            }
            let mut at = 0usize;
            for (offset, len) in
                layout::block_segments(&manifest.extents, manifest.block_bytes, index)
            {
                to.write_all_at(&block[at..at + len as usize], offset)
                    .map_err(|e| sys::SysError::io("write", to_path, e))?;
                at += len as usize;
            }
            Ok(())
        };
        for index in blocks.start..blocks.end.min(manifest.blocks.len() as u64) {
            while inflight.len() >= IN_FLIGHT {
                let (i, block) = join_one(&mut inflight).await?;
                write(i, block)?;
            }
            let start = index * manifest.block_bytes;
            let end = (start + manifest.block_bytes).min(data_bytes);
            let blob = Arc::clone(&blob);
            let url = url.to_string();
            inflight.spawn(async move {
                let mut block = vec![0u8; (end - start) as usize];
                let got = blob
                    .download_into(
                        &mut block,
                        Some(BlobClientDownloadOptions {
                            range: Some((start..end).into()),
                            ..BlobClientDownloadOptions::default()
                        }),
                    )
                    .await
                    .map_err(|e| classify(e, &url, "reading a block in"))?;
                if got.len != block.len() {
                    return Err(BackupError::Corrupt(format!(
                        "block {index} in {url} has {} bytes, not {}",
                        got.len,
                        block.len()
                    )));
                }
                Ok((index, block))
            });
        }
        while !inflight.is_empty() {
            let (i, block) = join_one(&mut inflight).await?;
            write(i, block)?;
        }
        Ok(())
    }

    /// Deletes the backup of `id` at `url`: the manifest first, so a half-deleted backup is
    /// never taken for a complete one, then the data, with the blocks an unfinished upload
    /// staged (they hold ciphertext and the wrapped DEK too): committing an empty block list
    /// discards them. What is already gone, or a container that does not exist, is fine.
    pub(crate) async fn delete(&self, url: &str, id: &str) -> Result<(), BackupError> {
        let container = self.container(url)?;
        let gone = |e: &azure_core::Error| {
            matches!(
                storage_code(e).as_deref(),
                Some("BlobNotFound" | "ContainerNotFound")
            )
        };
        for name in [MANIFEST_BLOB, DATA_BLOB] {
            let blob = container.blob_client(&blob_name(id, name));
            let blocks = blob.block_blob_client();
            match blocks
                .get_block_list(BlockListType::Uncommitted, None)
                .await
            {
                Ok(r) => {
                    let staged = r
                        .into_model()
                        .map_err(|e| classify(e, url, "listing the blocks in"))?
                        .uncommitted_blocks
                        .is_some_and(|b| !b.is_empty());
                    if staged {
                        let empty = BlockLookupList::default().try_into().map_err(|e| {
                            BackupError::Unavailable(format!("the block list: {e}"))
                        })?;
                        blocks
                            .commit_block_list(empty, None)
                            .await
                            .map_err(|e| classify(e, url, "discarding staged blocks in"))?;
                    }
                }
                Err(e) if gone(&e) => {}
                Err(e) => return Err(classify(e, url, "listing the blocks in")),
            }
            match blob.delete(None).await {
                Ok(_) => {}
                Err(e) if gone(&e) => {}
                Err(e) => return Err(classify(e, url, "deleting a backup in")),
            }
        }
        Ok(())
    }
}

fn blob_name(id: &str, name: &str) -> String {
    format!("{id}/{name}")
}

/// The blocks (id, size) of `data`'s blob already in the container, committed or staged.
async fn staged_blocks(
    data: &BlockBlobClient,
    url: &str,
    id: &str,
) -> Result<HashSet<(Vec<u8>, u64)>, BackupError> {
    let list = match data.get_block_list(BlockListType::All, None).await {
        Ok(r) => r
            .into_model()
            .map_err(|e| classify(e, url, "listing the blocks in"))?,
        Err(e) if storage_code(&e).as_deref() == Some("BlobNotFound") => return Ok(HashSet::new()),
        Err(e) => {
            return Err(classify(e, url, &format!("listing the blocks of {id} in")));
        }
    };
    Ok(named_blocks(list.committed_blocks)
        .into_iter()
        .chain(named_blocks(list.uncommitted_blocks))
        .collect())
}

/// (id, size) of each block in a block list.
fn named_blocks(blocks: Option<Vec<azure_storage_blob::models::Block>>) -> Vec<(Vec<u8>, u64)> {
    blocks
        .unwrap_or_default()
        .into_iter()
        .filter_map(|b| Some((b.name?, u64::try_from(b.size?).ok()?)))
        .collect()
}

/// Checks that the committed blob is exactly the blocks `ids` (each id names its content's
/// digest), of the sizes the data needs.
async fn verify_committed(
    data: &BlockBlobClient,
    url: &str,
    id: &str,
    ids: &[Vec<u8>],
    data_bytes: u64,
    block_bytes: u64,
) -> Result<(), BackupError> {
    let list = data
        .get_block_list(BlockListType::Committed, None)
        .await
        .map_err(|e| classify(e, url, "reading back the blocks in"))?
        .into_model()
        .map_err(|e| classify(e, url, "reading back the blocks in"))?;
    let committed = named_blocks(list.committed_blocks);
    let expected: Vec<(Vec<u8>, u64)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let start = i as u64 * block_bytes;
            (id.clone(), (start + block_bytes).min(data_bytes) - start)
        })
        .collect();
    if committed != expected {
        return Err(BackupError::Corrupt(format!(
            "the blob of {id} in {url} holds {} committed blocks that are not the {} uploaded",
            committed.len(),
            expected.len()
        )));
    }
    Ok(())
}

/// Reads block `index` of the data stream (the concatenated extents).
fn read_block(
    file: &File,
    path: &Path,
    extents: &[(u64, u64)],
    block_bytes: u64,
    index: u64,
) -> Result<Vec<u8>, BackupError> {
    let segments = layout::block_segments(extents, block_bytes, index);
    let len: u64 = segments.iter().map(|s| s.1).sum();
    let mut block = vec![0u8; len as usize];
    let mut at = 0usize;
    for (offset, seg) in segments {
        file.read_exact_at(&mut block[at..at + seg as usize], offset)
            .map_err(|e| sys::SysError::io("read", path, e))?;
        at += seg as usize;
    }
    Ok(block)
}

async fn join_one<T: 'static>(set: &mut JoinSet<Result<T, BackupError>>) -> Result<T, BackupError> {
    match set.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(BackupError::Unavailable(format!(
            "a block transfer failed: {e}"
        ))),
        None => Err(BackupError::Unavailable(
            "no block transfer to wait for".into(),
        )),
    }
}

/// The `x-ms-error-code` of a Blob storage error response.
fn storage_code(e: &azure_core::Error) -> Option<String> {
    match e.kind() {
        ErrorKind::HttpResponse {
            error_code: Some(code),
            ..
        } => Some(code.clone()),
        _ => None,
    }
}

/// Refusals (the identity has no role, Entra will not issue it a token, the container does not
/// exist) are the operator's to fix; everything else may pass.
fn classify(e: azure_core::Error, url: &str, doing: &str) -> BackupError {
    if matches!(e.kind(), ErrorKind::Credential) {
        return match crate::identity::classify(e) {
            crate::identity::IdentityError::Refused(why) => BackupError::Refused(format!(
                "Entra ID refused the driver's identity a token for Azure Storage ({doing} {url}): {why}"
            )),
            other => BackupError::Unavailable(format!(
                "no token for the driver's identity ({doing} {url}): {other}"
            )),
        };
    }
    let status = e.http_status().map(u16::from);
    let code = storage_code(&e).unwrap_or_default();
    match (status, code.as_str()) {
        (Some(401 | 403), _) => BackupError::Refused(format!(
            "{url} refused the driver's identity ({doing} it: HTTP {} {code}); it needs the role Storage Blob Data Contributor on that container",
            status.unwrap_or_default()
        )),
        (Some(404), "ContainerNotFound") => BackupError::Refused(format!(
            "the container {url} does not exist ({doing} it); create it"
        )),
        (Some(404), "BlobNotFound") => {
            BackupError::Gone(format!("{doing} {url}: the backup is gone ({code})"))
        }
        _ => BackupError::Unavailable(format!(
            "{doing} {url}: {}",
            crate::error_text::with_causes(&e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn container_urls_are_checked() {
        for ok in [
            "https://acct.blob.core.windows.net/backups",
            "https://acct.blob.core.windows.net/backups/",
            "https://127.0.0.1:10000/devstoreaccount1/backups",
        ] {
            assert_eq!(
                normalize_url(ok).as_deref(),
                Ok(ok.trim_end_matches('/')),
                "{ok}"
            );
        }
        for bad in [
            "http://acct.blob.core.windows.net/backups",
            "https://acct.blob.core.windows.net/backups?sv=2024&sig=x",
            "https://acct.blob.core.windows.net/backups#x",
            "https://user:pw@acct.blob.core.windows.net/backups",
            "https://acct.blob.core.windows.net/",
            "https://acct.blob.core.windows.net/a/b/c",
            "https://acct.blob.core.windows.net/Backups",
            "https://acct.blob.core.windows.net/back%2Fups",
            "https://acct.blob.core.windows.net/backups/..",
            "backups",
        ] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
        // `..` is resolved by URL parsing first: it can only name another container, which
        // the allow-list then refuses.
        assert_eq!(
            normalize_url("https://acct.blob.core.windows.net/x/../backups").as_deref(),
            Ok("https://acct.blob.core.windows.net/backups")
        );
    }

    proptest! {
        /// Whatever the text, a URL that passes is https, without query, fragment or user,
        /// and names one or two plain path segments.
        #[test]
        fn an_accepted_url_is_a_plain_container_url(raw in "\\PC{0,80}") {
            if let Ok(url) = normalize_url(&raw) {
                let parsed = Url::parse(&url).unwrap();
                prop_assert_eq!(parsed.scheme(), "https");
                prop_assert!(parsed.query().is_none() && parsed.fragment().is_none());
                prop_assert!(parsed.username().is_empty());
                let segments: Vec<&str> = parsed.path_segments().unwrap().collect();
                prop_assert!(matches!(segments.len(), 1 | 2));
                prop_assert!(segments.iter().all(|s| valid_segment(s)));
            }
        }
    }
}
