//! The emulator behaves as Azure does where sealvol, its tests or an operator can tell: keys'
//! attributes (enabled, nbf/exp, key_ops), names, paged version lists, secrets' attributes,
//! Managed HSM as its own service, soft delete and purge protection, role-assignment propagation delay, storage tokens. Each
//! expectation cites the documentation it follows, or the recorded observation where the
//! documentation is silent.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::time::Duration;

use reqwest::Method;
use sealvol_azure_emulator::crypto;
use sealvol_azure_emulator::{BlobAccess, Config, Options, RoleAssignment};
use serde_json::{Value, json};

const HSM: &str = "https://managedhsm.azure.net";
const VAULT: &str = "https://vault.azure.net";

fn version_of(bundle: &Value) -> String {
    let id = bundle["key"]["kid"]
        .as_str()
        .or(bundle["id"].as_str())
        .unwrap();
    id.rsplit('/').next().unwrap().to_string()
}

fn wrap_body(value: &[u8]) -> Option<Value> {
    Some(json!({"alg": "RSA-OAEP-256", "value": crypto::b64url(value)}))
}

#[tokio::test]
async fn a_disabled_key_wraps_encrypts_and_verifies_but_never_unwraps_decrypts_or_signs() {
    // Observed on the live service: Azure/azure-sdk-for-python#45342 (403 KeyDisabled for
    // decrypt, sign and unwrapKey; encrypt, verify and wrapKey allowed).
    let emu = start().await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let t = Some(t.as_str());
    let (_, w, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//wrapkey",
        wrap_body(b"0123456789abcdef"),
    )
    .await;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"message");
    let (s, sig, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//sign",
        Some(json!({"alg": "RS256", "value": crypto::b64url(digest.as_ref())})),
    )
    .await;
    assert_eq!(s, 200, "{sig}");
    assert!(emu.set_key_enabled("kv", "kek", false));
    for op in ["unwrapkey", "decrypt"] {
        let (s, b, _) = kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/kek//{op}"),
            Some(json!({"alg": "RSA-OAEP-256", "value": w["value"]})),
        )
        .await;
        assert_eq!(s, 403, "{op}");
        assert_eq!(b["error"]["code"], "Forbidden");
        assert_eq!(b["error"]["innererror"]["code"], "KeyDisabled");
    }
    let (_, b, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//unwrapkey",
        Some(json!({"alg": "RSA-OAEP-256", "value": w["value"]})),
    )
    .await;
    assert_eq!(
        b["error"]["message"],
        "Operation unwrapKey is not allowed on a disabled key."
    );
    let (s, _, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//sign",
        Some(json!({"alg": "RS256", "value": crypto::b64url(digest.as_ref())})),
    )
    .await;
    assert_eq!(s, 403);
    for op in ["wrapkey", "encrypt"] {
        let (s, _, _) = kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/kek//{op}"),
            wrap_body(b"0123456789abcdef"),
        )
        .await;
        assert_eq!(s, 200, "{op}");
    }
    let (s, v, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//verify",
        Some(json!({"alg": "RS256", "digest": crypto::b64url(digest.as_ref()), "value": sig["value"]})),
    )
    .await;
    assert_eq!((s, v["value"].as_bool()), (200, Some(true)));
    // Reading a disabled key still works; it says so.
    let (s, k, _) = kv(&emu, t, Method::GET, "/keys/kek", None).await;
    assert_eq!(
        (s, k["attributes"]["enabled"].as_bool()),
        (200, Some(false))
    );
    assert!(emu.set_key_enabled("kv", "kek", true));
    assert!(!emu.set_key_enabled("kv", "nope", true));

    // Versions: rotation from Rust, and one version disabled alone.
    let v1 = version_of(&k);
    let v2 = emu.rotate_key("kv", "kek").unwrap();
    assert_ne!(v1, v2);
    assert!(emu.rotate_key("kv", "nope").is_err());
    assert!(emu.set_key_version_enabled("kv", "kek", &v1, false));
    assert!(!emu.set_key_version_enabled("kv", "kek", "0000", false));
    let unwrap = |v: &str| format!("/keys/kek/{v}/unwrapkey");
    let body = Some(json!({"alg": "RSA-OAEP-256", "value": w["value"]}));
    assert_eq!(
        kv(&emu, t, Method::POST, &unwrap(&v1), body.clone())
            .await
            .0,
        403
    );
    let (_, w2, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//wrapkey",
        wrap_body(b"fedcba9876543210"),
    )
    .await;
    assert_eq!(version_of(&json!({"id": w2["kid"]})), v2);
    let (s, _, _) = kv(
        &emu,
        t,
        Method::POST,
        &unwrap(&v2),
        Some(json!({"alg": "RSA-OAEP-256", "value": w2["value"]})),
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn expired_and_not_yet_valid_keys_refuse_encrypt_wrap_and_sign_only() {
    // https://learn.microsoft.com/azure/key-vault/keys/about-keys-details#key-attributes
    // ("Date-time controlled operations"): outside nbf/exp a key still decrypts, unwraps and
    // verifies, and refuses the other operations with 403.
    let emu = start().await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let t = Some(t.as_str());
    let (_, w, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//wrapkey",
        wrap_body(b"0123456789abcdef"),
    )
    .await;
    let now = crypto::now();
    for attrs in [
        json!({"exp": now - 60}),
        json!({"exp": null, "nbf": now + 3600}),
    ] {
        let (s, b, _) = kv(
            &emu,
            t,
            Method::PATCH,
            "/keys/kek",
            Some(json!({"attributes": attrs})),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        for op in ["wrapkey", "encrypt"] {
            let (s, b, _) = kv(
                &emu,
                t,
                Method::POST,
                &format!("/keys/kek//{op}"),
                wrap_body(b"0123456789abcdef"),
            )
            .await;
            assert_eq!(
                (s, b["error"]["code"].as_str()),
                (403, Some("Forbidden")),
                "{attrs} {op}"
            );
        }
        let (s, u, _) = kv(
            &emu,
            t,
            Method::POST,
            "/keys/kek//unwrapkey",
            Some(json!({"alg": "RSA-OAEP-256", "value": w["value"]})),
        )
        .await;
        assert_eq!(s, 200, "{attrs}: {u}");
        assert_eq!(
            crypto::b64url_decode(u["value"].as_str().unwrap()).unwrap(),
            b"0123456789abcdef"
        );
    }
    // Attributes come back as set.
    let (_, k, _) = kv(&emu, t, Method::GET, "/keys/kek", None).await;
    assert_eq!(k["attributes"]["nbf"], now + 3600);
    assert!(k["attributes"].get("exp").is_none(), "{k}");
}

#[tokio::test]
async fn key_ops_given_at_creation_are_kept_and_enforced() {
    // Refused with 403 KeyOperationForbidden, "Operation decrypt is not permitted on this
    // key." (observed: Azure/azure-sdk-for-net#11518).
    let emu = start().await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let t = Some(t.as_str());
    let (s, k, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/wraponly/create",
        Some(json!({"kty": "RSA", "key_size": 2048, "key_ops": ["wrapKey", "unwrapKey"]})),
    )
    .await;
    assert_eq!(s, 200, "{k}");
    assert_eq!(k["key"]["key_ops"], json!(["wrapKey", "unwrapKey"]));
    assert_eq!(
        kv(&emu, t, Method::GET, "/keys/wraponly", None).await.1["key"]["key_ops"],
        json!(["wrapKey", "unwrapKey"])
    );
    let (_, e, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/wraponly//encrypt",
        wrap_body(b"x"),
    )
    .await;
    assert_eq!(e["error"]["innererror"]["code"], "KeyOperationForbidden");
    assert_eq!(
        e["error"]["message"],
        "Operation encrypt is not permitted on this key."
    );
    assert_eq!(
        kv(
            &emu,
            t,
            Method::POST,
            "/keys/wraponly//wrapkey",
            wrap_body(b"0123456789abcdef")
        )
        .await
        .0,
        200
    );
    // A rotation keeps the operations.
    let v = emu.rotate_key("kv", "wraponly").unwrap();
    let (_, k, _) = kv(&emu, t, Method::GET, &format!("/keys/wraponly/{v}"), None).await;
    assert_eq!(k["key"]["key_ops"], json!(["wrapKey", "unwrapKey"]));
    // Unknown operations are refused at creation.
    let (s, _, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/odd/create",
        Some(json!({"kty": "RSA", "key_ops": ["launch"]})),
    )
    .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn names_outside_keyvaults_pattern_are_refused() {
    // Names match ^[0-9a-zA-Z-]{1,127}$
    // (https://learn.microsoft.com/azure/key-vault/general/about-keys-secrets-certificates#objects-identifiers-and-versioning).
    let emu = start().await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let t = Some(t.as_str());
    let long = "a".repeat(128);
    for name in ["under_score", "dot.ted", long.as_str()] {
        let (s, b, _) = kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/{name}/create"),
            Some(json!({"kty": "RSA"})),
        )
        .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (400, Some("BadParameter")),
            "{name}"
        );
        let (s, _, _) = kv(
            &emu,
            t,
            Method::PUT,
            &format!("/secrets/{name}"),
            Some(json!({"value": "v"})),
        )
        .await;
        assert_eq!(s, 400, "{name}");
    }
    let ok = "a".repeat(127);
    assert_eq!(
        kv(
            &emu,
            t,
            Method::PUT,
            &format!("/secrets/{ok}"),
            Some(json!({"value": "v"}))
        )
        .await
        .0,
        200
    );
}

#[tokio::test]
async fn versions_are_listed_in_pages() {
    // GET /keys/{name}/versions and /secrets/{name}/versions answer {value, nextLink}, at most
    // maxresults (1 to 25) per page
    // (https://learn.microsoft.com/rest/api/keyvault/keys/get-key-versions/get-key-versions,
    // https://learn.microsoft.com/rest/api/keyvault/secrets/get-secret-versions/get-secret-versions).
    let emu = start().await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    for _ in 0..2 {
        emu.rotate_key("kv", "kek").unwrap();
    }
    for i in 0..3 {
        kv(
            &emu,
            Some(&t),
            Method::PUT,
            "/secrets/s",
            Some(json!({"value": format!("v{i}")})),
        )
        .await;
    }
    for path in ["/keys/kek/versions", "/secrets/s/versions"] {
        let (s, page, _) = kv(
            &emu,
            Some(&t),
            Method::GET,
            &format!("{path}?maxresults=2"),
            None,
        )
        .await;
        assert_eq!(s, 200, "{page}");
        assert_eq!(page["value"].as_array().unwrap().len(), 2);
        let next = page["nextLink"].as_str().unwrap().to_string();
        let rest: Value = http(&emu)
            .get(&next)
            .bearer_auth(&t)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(rest["value"].as_array().unwrap().len(), 1, "{rest}");
        assert!(rest["nextLink"].is_null());
        // Items carry ids with versions and no key material or secret value.
        let item = &page["value"][0];
        assert!(
            item.get("value").is_none() && item.get("key").is_none(),
            "{item}"
        );
        assert_eq!(
            item["kid"]
                .as_str()
                .or(item["id"].as_str())
                .unwrap()
                .matches('/')
                .count(),
            5
        );
    }
    let (s, _, _) = kv(
        &emu,
        Some(&t),
        Method::GET,
        "/keys/kek/versions?maxresults=26",
        None,
    )
    .await;
    assert_eq!(s, 400);
    let (s, all, _) = kv(&emu, Some(&t), Method::GET, "/keys", None).await;
    assert_eq!(s, 200);
    assert!(
        all["value"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"].as_str().unwrap().ends_with("/keys/kek"))
    );
}

#[tokio::test]
async fn secrets_are_updated_and_a_disabled_one_is_refused() {
    // PATCH /secrets/{name}/{version} updates enabled, contentType and exp
    // (https://learn.microsoft.com/rest/api/keyvault/secrets/update-secret/update-secret); a
    // disabled secret answers 403 SecretDisabled; exp is informational for secrets, get still
    // answers (https://learn.microsoft.com/azure/key-vault/secrets/about-secrets).
    let emu = start().await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let t = Some(t.as_str());
    let (_, s1, _) = kv(
        &emu,
        t,
        Method::PUT,
        "/secrets/s",
        Some(json!({"value": "one"})),
    )
    .await;
    let v1 = version_of(&s1);
    let now = crypto::now();
    let (s, b, _) = kv(
        &emu,
        t,
        Method::PATCH,
        &format!("/secrets/s/{v1}"),
        Some(json!({"contentType": "text/plain", "attributes": {"exp": now - 10}})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(
        b.get("value").is_none(),
        "an update does not answer the value"
    );
    assert_eq!(b["contentType"], "text/plain");
    assert_eq!(b["attributes"]["exp"], now - 10);
    let (s, g, _) = kv(&emu, t, Method::GET, "/secrets/s", None).await;
    assert_eq!(
        (s, g["value"].as_str()),
        (200, Some("one")),
        "expired secrets are still read"
    );
    kv(
        &emu,
        t,
        Method::PATCH,
        "/secrets/s/",
        Some(json!({"attributes": {"enabled": false}})),
    )
    .await;
    let (s, b, _) = kv(&emu, t, Method::GET, "/secrets/s", None).await;
    assert_eq!(s, 403);
    assert_eq!(b["error"]["innererror"]["code"], "SecretDisabled");
    assert!(emu.set_secret_enabled("kv", "s", true));
    assert_eq!(kv(&emu, t, Method::GET, "/secrets/s", None).await.0, 200);
    assert!(emu.set_secret_enabled("kv", "kek-secret", false));
    assert_eq!(
        kv(&emu, t, Method::GET, "/secrets/kek-secret", None)
            .await
            .0,
        403
    );
    assert!(!emu.set_secret_enabled("kv", "nope", false));
}

#[tokio::test]
async fn managed_hsm_is_a_service_of_its_own() {
    let emu = start().await;
    let url = emu.hsm_url("mhsm").unwrap();
    assert_ne!(Some(url.clone()), emu.vault_url("kv"));
    // The challenge names the Managed HSM resource
    // (https://learn.microsoft.com/azure/key-vault/managed-hsm/authorize-azure-resource-manager).
    let (s, _, h) = hsm(&emu, None, Method::GET, "/keys/hsm", None).await;
    assert_eq!(s, 401);
    assert_eq!(
        h["www-authenticate"],
        format!(
            "Bearer authorization=\"{}/{TENANT}\", resource=\"{HSM}\"",
            emu.base_url
        )
    );
    // A Key Vault token does not open the HSM, nor an HSM token a vault.
    let vault_token = token_for(&emu, APP_CLIENT, "app", VAULT).await;
    let hsm_token = token_for(&emu, APP_CLIENT, "app", HSM).await;
    let (_, claims) = crypto::peek_jwt(&hsm_token).unwrap();
    assert_eq!(claims["aud"], HSM);
    assert_eq!(
        hsm(&emu, Some(&vault_token), Method::GET, "/keys/hsm", None)
            .await
            .0,
        401
    );
    assert_eq!(
        kv(&emu, Some(&hsm_token), Method::GET, "/keys/kek", None)
            .await
            .0,
        401
    );
    let t = Some(hsm_token.as_str());
    // oct-HSM keys wrap with A256KW
    // (https://learn.microsoft.com/azure/key-vault/managed-hsm/about-keys-details).
    let dek = crypto::random_bytes(32);
    let (s, k, _) = hsm(&emu, t, Method::GET, "/keys/hsm", None).await;
    assert_eq!((s, k["key"]["kty"].as_str()), (200, Some("oct-HSM")), "{k}");
    assert!(
        k["key"]["kid"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{url}/keys/hsm/"))
    );
    assert!(
        k["key"].get("k").is_none(),
        "symmetric key material never leaves the HSM"
    );
    let (s, w, _) = hsm(
        &emu,
        t,
        Method::POST,
        "/keys/hsm//wrapkey",
        Some(json!({"alg": "A256KW", "value": crypto::b64url(&dek)})),
    )
    .await;
    assert_eq!(s, 200, "{w}");
    let (_, u, _) = hsm(
        &emu,
        t,
        Method::POST,
        "/keys/hsm//unwrapkey",
        Some(json!({"alg": "A256KW", "value": w["value"]})),
    )
    .await;
    assert_eq!(
        crypto::b64url_decode(u["value"].as_str().unwrap()).unwrap(),
        dek
    );
    assert_eq!(
        hsm(
            &emu,
            t,
            Method::POST,
            "/keys/hsm//wrapkey",
            Some(json!({"alg": "RSA-OAEP-256", "value": crypto::b64url(&dek)}))
        )
        .await
        .0,
        400
    );
    // RSA-HSM and oct-HSM are created; software RSA is not an HSM key.
    for (name, kty, size, want) in [
        ("r", "RSA-HSM", 2048, 200),
        ("o", "oct-HSM", 256, 200),
        ("s", "RSA", 2048, 400),
    ] {
        let (s, b, _) = hsm(
            &emu,
            t,
            Method::POST,
            &format!("/keys/{name}/create"),
            Some(json!({"kty": kty, "key_size": size})),
        )
        .await;
        assert_eq!(s, want, "{kty}: {b}");
    }
    // No secrets in an HSM.
    assert_eq!(hsm(&emu, t, Method::GET, "/secrets/x", None).await.0, 400);
    // Local RBAC: Crypto Service Encryption User on one key; Crypto Officer does not use keys
    // (https://learn.microsoft.com/azure/key-vault/managed-hsm/built-in-roles).
    let other = token_for(&emu, OTHER_CLIENT, "other", HSM).await;
    let o = Some(other.as_str());
    let unwrap = Some(json!({"alg": "A256KW", "value": w["value"]}));
    let (s, b, _) = hsm(
        &emu,
        o,
        Method::POST,
        "/keys/hsm//unwrapkey",
        unwrap.clone(),
    )
    .await;
    assert_eq!(s, 403);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Microsoft.KeyVault/managedHsm/keys/unwrap/action")
    );
    emu.assign_role(RoleAssignment {
        principal: OTHER_OID.into(),
        role: "Managed HSM Crypto Officer".into(),
        scope: "/hsms/mhsm".into(),
    });
    assert_eq!(
        hsm(
            &emu,
            o,
            Method::POST,
            "/keys/hsm//unwrapkey",
            unwrap.clone()
        )
        .await
        .0,
        403
    );
    emu.assign_role(RoleAssignment {
        principal: OTHER_OID.into(),
        role: "Managed HSM Crypto Service Encryption User".into(),
        scope: "/hsms/mhsm/keys/hsm".into(),
    });
    assert_eq!(
        hsm(
            &emu,
            o,
            Method::POST,
            "/keys/hsm//unwrapkey",
            unwrap.clone()
        )
        .await
        .0,
        200
    );
    assert_eq!(hsm(&emu, o, Method::GET, "/keys/r", None).await.0, 403);
    // A vault role at a vault of the same name would not count: scopes are per service.
    // Records and counters name the service.
    let records = emu.records();
    let last = records.last().unwrap();
    assert_eq!(
        (
            last.service.as_str(),
            last.vault.as_str(),
            last.route.as_str()
        ),
        ("managedhsm", "mhsm", "managedhsm.get_key")
    );
    assert_eq!(last.object_id.as_deref(), Some(OTHER_OID));
    assert!(emu.count("managedhsm.unwrap", Some(200)) >= 2);
    assert_eq!(emu.count("keyvault.unwrap", None), 0);
    // The Rust API reaches HSM keys too.
    assert!(emu.set_key_enabled("mhsm", "hsm", false));
    assert_eq!(
        hsm(&emu, o, Method::POST, "/keys/hsm//unwrapkey", unwrap)
            .await
            .0,
        403
    );
}

#[tokio::test]
async fn a_vault_refuses_symmetric_keys_in_its_configuration() {
    let config = Config::parse(
        &json!({"vaults": [{"name": "kv", "tenant": TENANT, "keys": [{"name": "hsm", "kty": "oct-HSM"}]}]})
            .to_string(),
    )
    .unwrap();
    let e = sealvol_azure_emulator::Emulator::start(Options {
        config,
        ..Options::default()
    })
    .await
    .err()
    .unwrap();
    assert!(e.contains("hsms"), "{e}");
}

#[tokio::test]
async fn soft_deleted_objects_are_kept_recovered_purged_and_protected() {
    // https://learn.microsoft.com/azure/key-vault/general/soft-delete-overview: deleted keys and
    // secrets stay (get, list, recover, purge); the name cannot be reused meanwhile (409, as
    // observed in Azure/azure-rest-api-specs#9222); with purge protection purge is refused
    // (403, as observed in microsoft/AzureTRE#1951).
    let emu = start().await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let t = Some(t.as_str());
    let (_, w, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//wrapkey",
        wrap_body(b"0123456789abcdef"),
    )
    .await;
    let (s, d, _) = kv(&emu, t, Method::DELETE, "/keys/kek", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        d["recoveryId"],
        format!("{}/deletedkeys/kek", emu.vault_url("kv").unwrap())
    );
    assert!(
        d["scheduledPurgeDate"].as_u64().unwrap()
            >= d["deletedDate"].as_u64().unwrap() + 90 * 86_400
    );
    assert_eq!(kv(&emu, t, Method::GET, "/keys/kek", None).await.0, 404);
    let (s, g, _) = kv(&emu, t, Method::GET, "/deletedkeys/kek", None).await;
    assert_eq!((s, g["key"]["kty"].as_str()), (200, Some("RSA")));
    let (_, l, _) = kv(&emu, t, Method::GET, "/deletedkeys", None).await;
    assert_eq!(l["value"].as_array().unwrap().len(), 1);
    let (s, b, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek/create",
        Some(json!({"kty": "RSA"})),
    )
    .await;
    assert_eq!((s, b["error"]["code"].as_str()), (409, Some("Conflict")));
    // Recovered: every version back, the old wrap unwraps.
    let (s, _, _) = kv(&emu, t, Method::POST, "/deletedkeys/kek/recover", None).await;
    assert_eq!(s, 200);
    let (s, _, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//unwrapkey",
        Some(json!({"alg": "RSA-OAEP-256", "value": w["value"]})),
    )
    .await;
    assert_eq!(s, 200);
    // Purged: gone for good, the name free again.
    kv(&emu, t, Method::DELETE, "/keys/kek", None).await;
    assert_eq!(
        kv(&emu, t, Method::DELETE, "/deletedkeys/kek", None)
            .await
            .0,
        204
    );
    assert_eq!(
        kv(&emu, t, Method::GET, "/deletedkeys/kek", None).await.0,
        404
    );
    assert_eq!(
        kv(
            &emu,
            t,
            Method::POST,
            "/keys/kek/create",
            Some(json!({"kty": "RSA"}))
        )
        .await
        .0,
        200
    );
    // Secrets likewise, and purge protection.
    assert_eq!(
        kv(&emu, t, Method::DELETE, "/secrets/kek-secret", None)
            .await
            .0,
        200
    );
    assert_eq!(
        kv(
            &emu,
            t,
            Method::PUT,
            "/secrets/kek-secret",
            Some(json!({"value": "x"}))
        )
        .await
        .0,
        409
    );
    assert_eq!(
        kv(&emu, t, Method::GET, "/deletedsecrets/kek-secret", None)
            .await
            .0,
        200
    );
    assert!(emu.set_purge_protection("kv", true));
    let (s, b, _) = kv(&emu, t, Method::DELETE, "/deletedsecrets/kek-secret", None).await;
    assert_eq!(s, 403);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("purge protection")
    );
    let (_, k, _) = kv(&emu, t, Method::GET, "/keys/kek", None).await;
    assert_eq!(k["attributes"]["recoveryLevel"], "Recoverable");
    assert_eq!(
        kv(
            &emu,
            t,
            Method::POST,
            "/deletedsecrets/kek-secret/recover",
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        kv(&emu, t, Method::GET, "/secrets/kek-secret", None)
            .await
            .1["value"],
        "c2VjcmV0"
    );
}

#[tokio::test]
async fn role_changes_wait_for_the_propagation_delay() {
    // https://learn.microsoft.com/azure/role-based-access-control/troubleshooting#symptom---role-assignment-changes-are-not-being-detected:
    // assignment changes can take minutes to take effect; here the delay is a setting.
    let emu = start().await;
    emu.set_propagation_delay(Duration::from_millis(400));
    let t = access_token(&emu, OTHER_CLIENT, "other").await;
    let ra = RoleAssignment {
        principal: OTHER_OID.into(),
        role: "Key Vault Reader".into(),
        scope: "/vaults/kv".into(),
    };
    emu.assign_role(ra.clone());
    assert_eq!(
        kv(&emu, Some(&t), Method::GET, "/keys/kek", None).await.0,
        403
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        kv(&emu, Some(&t), Method::GET, "/keys/kek", None).await.0,
        200
    );
    assert!(emu.revoke_role(&ra));
    assert!(!emu.revoke_role(&ra), "already revoked (pending)");
    assert_eq!(
        kv(&emu, Some(&t), Method::GET, "/keys/kek", None).await.0,
        200,
        "still in effect"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        kv(&emu, Some(&t), Method::GET, "/keys/kek", None).await.0,
        403
    );
    // From the configuration file too.
    let mut config = config();
    config.propagation_delay_ms = 300;
    let emu = start_with(Options {
        config,
        admin: true,
        ..Options::default()
    })
    .await;
    let t = access_token(&emu, OTHER_CLIENT, "other").await;
    emu.assign_role(ra);
    assert_eq!(
        kv(&emu, Some(&t), Method::GET, "/keys/kek", None).await.0,
        403
    );
}

#[tokio::test]
async fn storage_blob_data_roles() {
    // https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/storage
    let mut config = config();
    config.role_assignments.push(RoleAssignment {
        principal: OTHER_OID.into(),
        role: "Storage Blob Data Reader".into(),
        scope: "/storageAccounts/devstoreaccount1/containers/backups".into(),
    });
    let emu = start_with(Options {
        config,
        admin: true,
        ..Options::default()
    })
    .await;
    assert!(emu.blob_allowed(
        OTHER_OID,
        "devstoreaccount1",
        Some("backups"),
        BlobAccess::Read
    ));
    assert!(!emu.blob_allowed(
        OTHER_OID,
        "devstoreaccount1",
        Some("backups"),
        BlobAccess::Write
    ));
    assert!(!emu.blob_allowed(
        OTHER_OID,
        "devstoreaccount1",
        Some("other"),
        BlobAccess::Read
    ));
    assert!(!emu.blob_allowed(
        APP_OID,
        "devstoreaccount1",
        Some("backups"),
        BlobAccess::Read
    ));
    // The control plane knows the storage roles and refuses a role at a foreign scope.
    let c = http(&emu);
    let post = |body: Value| {
        c.post(format!("{}/_emulator/role-assignments", emu.base_url))
            .json(&body)
            .send()
    };
    assert_eq!(post(json!({"principal": APP_OID, "role": "Storage Blob Data Owner", "scope": "/storageAccounts/devstoreaccount1"})).await.unwrap().status(), 204);
    assert!(emu.blob_allowed(APP_OID, "devstoreaccount1", Some("any"), BlobAccess::Delete));
    assert_eq!(
        post(
            json!({"principal": APP_OID, "role": "Storage Blob Data Owner", "scope": "/vaults/kv"})
        )
        .await
        .unwrap()
        .status(),
        400
    );
}
