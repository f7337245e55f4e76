//! No key residue: after each call returns (first publish, republish with re-authorization,
//! unpublish, unstage, delete), the node plugin's memory holds no copy of a volume's DEK or of
//! a KEK secret, raw or encoded (base64, base64url, hex), in any readable mapping of the
//! process, read through /proc/PID/mem. In both key modes, and with both kinds of key memory.

#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::azure::*;

/// The forms a key could be copied in: raw (whole, and its first 16 bytes, as a key schedule
/// starts), and its encodings (without their last characters, which depend on padding).
fn needles(name: &str, key: &[u8]) -> Vec<(String, Vec<u8>)> {
    let cut = |s: String| s.as_bytes()[..s.len() - 4].to_vec();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        (format!("{name} raw"), key.to_vec()),
        (format!("{name} raw prefix"), key[..16].to_vec()),
        (format!("{name} base64"), cut(STANDARD.encode(key))),
        (
            format!("{name} base64url"),
            cut(URL_SAFE_NO_PAD.encode(key)),
        ),
        (format!("{name} hex"), hex.into_bytes()),
    ]
}

/// Where each needle occurs in the readable memory of process `pid`: (needle, address,
/// mapping). Reads every readable mapping through /proc/PID/mem, in overlapping chunks.
fn scan(pid: u32, needles: &[(String, Vec<u8>)]) -> Vec<(String, u64, String)> {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let longest = needles.iter().map(|(_, n)| n.len()).max().unwrap_or(0);
    let finders: Vec<_> = needles
        .iter()
        .map(|(name, n)| (name, memchr::memmem::Finder::new(n)))
        .collect();
    let mut hits = Vec::new();
    let mut bytes_read = 0usize;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let mapping = fields.nth(3).unwrap_or("[anon]").to_string();
        if !perms.starts_with('r') || mapping == "[vvar]" || mapping == "[vsyscall]" {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut at = start;
        let mut buf = vec![0u8; 1 << 20];
        while at < end {
            let len = ((end - at) as usize).min(buf.len());
            // Unreadable pages (guard pages, secret memory) read as errors: skip them.
            let Ok(n) = mem.read_at(&mut buf[..len], at) else {
                at += len as u64;
                continue;
            };
            if n == 0 {
                break;
            }
            bytes_read += n;
            for (name, finder) in &finders {
                for offset in finder.find_iter(&buf[..n]) {
                    hits.push(((*name).clone(), at + offset as u64, mapping.clone()));
                }
            }
            // Overlap so a needle across a chunk boundary is found.
            let step = if n > longest { n - longest + 1 } else { n };
            at += step as u64;
        }
    }
    assert!(
        bytes_read > 1 << 20,
        "the scan read only {bytes_read} bytes"
    );
    hits.sort();
    hits.dedup();
    hits
}

/// The DEK of volume `id`, recovered from its header as only the KEK's holder can.
fn dek_of(azure: &Azure, node: &ScratchNode, id: &str, mode: &str, kek_secret: &str) -> Vec<u8> {
    let wrapped = &header(node, id)["kms"]["wrapped"];
    let version = wrapped["kek_version"].as_str().unwrap();
    let ciphertext = STANDARD
        .decode(wrapped["ciphertext"].as_str().unwrap())
        .unwrap();
    if mode == "keyvault-key" {
        return azure
            .emu
            .unwrap_as_vault("kv", "kek", version, &ciphertext)
            .unwrap();
    }
    let kek = STANDARD.decode(kek_secret).unwrap();
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek).unwrap());
    let (nonce, sealed) = ciphertext.split_at(NONCE_LEN);
    let mut sealed = sealed.to_vec();
    let aad = format!("sealvol|{id}|header-v1");
    let plain = key
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).unwrap(),
            Aad::from(aad.as_bytes()),
            &mut sealed,
        )
        .unwrap();
    plain.to_vec()
}

async fn no_residue_in(mode: &str, key_memory: &str) {
    let azure = Azure::start().await;
    let (node, mut c) = node_with(
        &azure,
        &[
            "--reauthorize-interval=0s",
            &format!("--key-memory={key_memory}"),
        ],
    )
    .await;
    let pid = node.pid().unwrap();
    // A KEK secret made for this test: the fixtures' constant is in the binary's own image.
    let mut kek = [0u8; 32];
    aws_lc_rs::rand::fill(&mut kek).unwrap();
    let kek_secret = STANDARD.encode(kek);
    azure
        .emu
        .set_secret("kv", "kek-secret", &kek_secret)
        .unwrap();
    let id = create_encrypted(&mut c, &azure, "pvc-residue", mode).await;
    c.node.node_stage_volume(node.stage(&id)).await.unwrap();
    let publish = || publish_as(&node, &id, "pod-a", &azure.token("app"), "app");
    c.node.node_publish_volume(publish()).await.unwrap();
    let dek = dek_of(&azure, &node, &id, mode, &kek_secret);
    assert_eq!(dek.len(), 64);
    let mut keys = needles("DEK", &dek);
    if mode == "keyvault-secret" {
        keys.extend(needles("KEK secret", &kek));
    }
    // The scan finds what is there: the volume id is in the process's memory.
    let probe = [("volume id".to_string(), id.as_bytes().to_vec())];
    assert!(
        !scan(pid, &probe).is_empty(),
        "the scan cannot read the process"
    );

    let check = |after: &str| {
        let hits = scan(pid, &keys);
        assert!(
            hits.is_empty(),
            "{mode}, {key_memory} key memory, after {after}: key material in the node plugin's memory: {hits:#x?}"
        );
    };
    check("the first publish");
    for _ in 0..2 {
        c.node.node_publish_volume(publish()).await.unwrap();
    }
    let releases = if mode == "keyvault-key" {
        azure.unwraps()
    } else {
        azure.emu.count("keyvault.get_secret", Some(200))
    };
    assert!(
        releases >= 3,
        "republishes re-authorized: {releases} key releases"
    );
    check("republishes with re-authorization");
    c.node
        .node_unpublish_volume(node.unpublish(&id, "pod-a"))
        .await
        .unwrap();
    check("unpublish");
    c.node.node_unstage_volume(node.unstage(&id)).await.unwrap();
    delete(&mut c, &id).await.unwrap();
    check("unstage and delete");
    assert_clean(&node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_dek_residue_in_keyvault_key_mode() {
    no_residue_in("keyvault-key", "locked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_dek_or_kek_residue_in_keyvault_secret_mode() {
    no_residue_in("keyvault-secret", "locked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_residue_with_secret_key_memory() {
    // memfd_secret exists on this kernel (a unit test of sys::keymem says where it does not).
    no_residue_in("keyvault-secret", "secret").await;
}
