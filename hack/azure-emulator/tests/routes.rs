//! Every route of the emulator and every error it promises, over real HTTPS.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use reqwest::Method;
use sealvol_azure_emulator::crypto::{self, SigningKey};
use sealvol_azure_emulator::{FaultKind, FaultSpec, Options, RoleAssignment, TokenRequest};
use serde_json::{Value, json};

fn aadsts(body: &Value) -> u64 {
    body["error_codes"][0].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn discovery_documents() {
    let emu = start().await;
    let c = http(&emu);
    let doc: Value = c
        .get(format!(
            "{}/{TENANT}/v2.0/.well-known/openid-configuration",
            emu.base_url
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["token_endpoint"],
        format!("{}/{TENANT}/oauth2/v2.0/token", emu.base_url)
    );
    assert_eq!(doc["issuer"], format!("{}/{TENANT}/v2.0", emu.base_url));
    let r = c
        .get(format!(
            "{}/nope/v2.0/.well-known/openid-configuration",
            emu.base_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let inst: Value = c
        .get(format!("{}/common/discovery/instance?api-version=1.1&authorization_endpoint={}/{TENANT}/oauth2/v2.0/authorize", emu.base_url, emu.base_url))
        .send().await.unwrap().json().await.unwrap();
    assert_eq!(
        inst["tenant_discovery_endpoint"],
        format!(
            "{}/{TENANT}/v2.0/.well-known/openid-configuration",
            emu.base_url
        )
    );
    let issuer: Value = c
        .get(format!(
            "{}/.well-known/openid-configuration",
            emu.issuer_url("cluster")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jwks: Value = c
        .get(issuer["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "RSA");
}

#[tokio::test]
async fn service_account_tokens_look_like_kube_apiservers() {
    let emu = start().await;
    let token = sa_token(&emu, "cluster", "app");
    let (_, claims) = crypto::peek_jwt(&token).unwrap();
    assert_eq!(claims["iss"], emu.issuer_url("cluster"));
    assert_eq!(claims["sub"], "system:serviceaccount:default:app");
    assert_eq!(claims["aud"][0], "api://AzureADTokenExchange");
    assert_eq!(claims["kubernetes.io"]["namespace"], "default");
    assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "app");
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "pod-1");
    for k in ["exp", "iat", "nbf"] {
        assert!(claims[k].as_u64().is_some(), "{k}");
    }
}

#[tokio::test]
async fn the_exchange_accepts_a_federated_assertion() {
    let emu = start().await;
    let (status, body) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &sa_token(&emu, "cluster", "app"),
        "https://vault.azure.net/.default",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["expires_in"].as_u64().unwrap() > 3000);
    let (_, claims) = crypto::peek_jwt(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["aud"], "https://vault.azure.net");
    assert_eq!(claims["tid"], TENANT);
    assert_eq!(claims["oid"], APP_OID);
    assert_eq!(claims["appid"], APP_CLIENT);
    assert!(claims["exp"].as_u64().unwrap() > crypto::now());
}

#[tokio::test]
async fn the_exchange_refuses_with_entras_codes() {
    let emu = start().await;
    let good = sa_token(&emu, "cluster", "app");
    let scope = "https://vault.azure.net/.default";
    let (s, b) = exchange(&emu, "no-such-tenant", APP_CLIENT, &good, scope).await;
    assert_eq!((s, aadsts(&b)), (400, 90002));
    let (s, b) = exchange(
        &emu,
        TENANT,
        "00000000-0000-0000-0000-000000000000",
        &good,
        scope,
    )
    .await;
    assert_eq!((s, aadsts(&b)), (400, 700016));
    // Another service account: no federated credential names it.
    let (s, b) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &sa_token(&emu, "cluster", "intruder"),
        scope,
    )
    .await;
    assert_eq!((s, aadsts(&b)), (400, 70021));
    assert!(
        b["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS70021: No matching federated identity record")
    );
    // The other identity's own token does not open the app.
    let (s, b) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &sa_token(&emu, "cluster", "other"),
        scope,
    )
    .await;
    assert_eq!((s, aadsts(&b)), (400, 70021));
    // Wrong audience.
    let wrong_aud = emu
        .mint_token(
            "cluster",
            &TokenRequest {
                namespace: "default".into(),
                service_account: "app".into(),
                audiences: vec!["https://kubernetes.default.svc".into()],
                pod_name: None,
                pod_uid: None,
                ttl_secs: 3600,
                offset_secs: 0,
            },
        )
        .unwrap();
    let (s, b) = exchange(&emu, TENANT, APP_CLIENT, &wrong_aud, scope).await;
    assert_eq!((s, aadsts(&b)), (400, 70021));
    // Expired beyond the clock skew, and not yet valid.
    for offset in [-7200, 7200] {
        let t = emu
            .mint_token(
                "cluster",
                &TokenRequest {
                    namespace: "default".into(),
                    service_account: "app".into(),
                    audiences: vec!["api://AzureADTokenExchange".into()],
                    pod_name: None,
                    pod_uid: None,
                    ttl_secs: 600,
                    offset_secs: offset,
                },
            )
            .unwrap();
        let (s, b) = exchange(&emu, TENANT, APP_CLIENT, &t, scope).await;
        assert_eq!((s, aadsts(&b)), (401, 700024), "offset {offset}: {b}");
    }
    // Forged: right claims, signed by a key the issuer never published.
    let (header, claims) = crypto::peek_jwt(&good).unwrap();
    let forger = SigningKey::generate().unwrap();
    let forged = forger.sign(&claims).unwrap();
    let (s, b) = exchange(&emu, TENANT, APP_CLIENT, &forged, scope).await;
    assert_eq!((s, aadsts(&b)), (401, 50013));
    // Forged with the real kid copied in: the signature itself fails.
    let mut parts: Vec<String> = forged.split('.').map(str::to_string).collect();
    parts[0] = crypto::b64url(header.to_string().as_bytes());
    let (s, b) = exchange(&emu, TENANT, APP_CLIENT, &parts.join("."), scope).await;
    assert_eq!((s, aadsts(&b)), (401, 50013), "{b}");
    let (s, b) = exchange(&emu, TENANT, APP_CLIENT, "not.a.jwt", scope).await;
    assert_eq!((s, aadsts(&b)), (400, 50027));
    let (s, b) = exchange(&emu, TENANT, APP_CLIENT, &good, "https://vault.azure.net").await;
    assert_eq!((s, aadsts(&b)), (400, 70011));
}

#[tokio::test]
async fn key_vault_challenges_and_checks_tokens() {
    let emu = start().await;
    let (s, b, h) = kv(&emu, None, Method::GET, "/keys/kek", None).await;
    assert_eq!(s, 401);
    assert_eq!(
        h["www-authenticate"],
        format!(
            "Bearer authorization=\"{}/{TENANT}\", resource=\"https://vault.azure.net\"",
            emu.base_url
        )
    );
    assert_eq!(b["error"]["code"], "Unauthorized");
    // A token for another resource.
    let (_, body) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &sa_token(&emu, "cluster", "app"),
        "https://storage.azure.com/.default",
    )
    .await;
    let (s, b, _) = kv(
        &emu,
        body["access_token"].as_str(),
        Method::GET,
        "/keys/kek",
        None,
    )
    .await;
    assert_eq!(s, 401);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("AKV10022"),
        "{b}"
    );
    // Expired, and signed by someone else.
    let now = crypto::now();
    let expired = emu.shared.token_key.sign(&json!({"aud": "https://vault.azure.net", "tid": TENANT, "oid": APP_OID, "exp": now - 60, "nbf": now - 3600})).unwrap();
    assert_eq!(
        kv(&emu, Some(&expired), Method::GET, "/keys/kek", None)
            .await
            .0,
        401
    );
    let foreign = SigningKey::generate().unwrap().sign(&json!({"aud": "https://vault.azure.net", "tid": TENANT, "oid": APP_OID, "exp": now + 600})).unwrap();
    assert_eq!(
        kv(&emu, Some(&foreign), Method::GET, "/keys/kek", None)
            .await
            .0,
        401
    );
    let other_tenant = emu.shared.token_key.sign(&json!({"aud": "https://vault.azure.net", "tid": "another", "oid": APP_OID, "exp": now + 600})).unwrap();
    assert_eq!(
        kv(&emu, Some(&other_tenant), Method::GET, "/keys/kek", None)
            .await
            .0,
        401
    );
    // api-version is required.
    let token = access_token(&emu, APP_CLIENT, "app").await;
    let r = http(&emu)
        .get(format!("{}/keys/kek", emu.vault_url("kv").unwrap()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn keys_create_wrap_rotate_disable_delete() {
    let emu = start().await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let t = Some(t.as_str());
    for (name, kty, size) in [
        ("r2", "RSA", 2048),
        ("r3", "RSA", 3072),
        ("r4", "RSA-HSM", 4096),
    ] {
        let (s, b, _) = kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/{name}/create"),
            Some(json!({"kty": kty, "key_size": size})),
        )
        .await;
        assert_eq!(s, 200, "{name}: {b}");
        assert_eq!(b["key"]["kty"], kty);
        if kty == "RSA" {
            assert_eq!(
                crypto::b64url_decode(b["key"]["n"].as_str().unwrap())
                    .unwrap()
                    .len()
                    * 8,
                size
            );
        }
    }
    assert_eq!(
        kv(
            &emu,
            t,
            Method::POST,
            "/keys/bad/create",
            Some(json!({"kty": "RSA", "key_size": 1024}))
        )
        .await
        .0,
        400
    );
    // Symmetric keys are a Managed HSM's: a vault refuses them
    // (https://learn.microsoft.com/azure/key-vault/keys/about-keys-details).
    for kty in ["oct", "oct-HSM"] {
        let (s, b, _) = kv(
            &emu,
            t,
            Method::POST,
            "/keys/o/create",
            Some(json!({"kty": kty, "key_size": 256})),
        )
        .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (400, Some("BadParameter"))
        );
    }

    let dek = crypto::random_bytes(64);
    let (_, latest, _) = kv(&emu, t, Method::GET, "/keys/kek", None).await;
    let kid = latest["key"]["kid"].as_str().unwrap().to_string();
    let v1 = kid.rsplit('/').next().unwrap().to_string();
    for alg in ["RSA-OAEP", "RSA-OAEP-256"] {
        let (s, w, _) = kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/kek/{v1}/wrapkey"),
            Some(json!({"alg": alg, "value": crypto::b64url(&dek)})),
        )
        .await;
        assert_eq!(s, 200, "{w}");
        assert_eq!(w["kid"], kid);
        let (s, u, _) = kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/kek/{v1}/unwrapkey"),
            Some(json!({"alg": alg, "value": w["value"]})),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(
            crypto::b64url_decode(u["value"].as_str().unwrap()).unwrap(),
            dek
        );
        let (_, e, _) = kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/kek/{v1}/encrypt"),
            Some(json!({"alg": alg, "value": crypto::b64url(b"plaintext")})),
        )
        .await;
        let (_, d, _) = kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/kek/{v1}/decrypt"),
            Some(json!({"alg": alg, "value": e["value"]})),
        )
        .await;
        assert_eq!(
            crypto::b64url_decode(d["value"].as_str().unwrap()).unwrap(),
            b"plaintext"
        );
    }
    // Rotation: a new latest version; the old one still unwraps.
    let (_, w1, _) = kv(
        &emu,
        t,
        Method::POST,
        &format!("/keys/kek/{v1}/wrapkey"),
        Some(json!({"alg": "RSA-OAEP-256", "value": crypto::b64url(&dek)})),
    )
    .await;
    let (s, rotated, _) = kv(&emu, t, Method::POST, "/keys/kek/rotate", None).await;
    assert_eq!(s, 200);
    let v2 = rotated["key"]["kid"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    assert_ne!(v1, v2);
    assert_eq!(
        kv(&emu, t, Method::GET, "/keys/kek", None).await.1["key"]["kid"],
        rotated["key"]["kid"]
    );
    assert_eq!(
        kv(&emu, t, Method::GET, &format!("/keys/kek/{v1}"), None)
            .await
            .1["key"]["kid"],
        kid
    );
    let (s, u, _) = kv(
        &emu,
        t,
        Method::POST,
        &format!("/keys/kek/{v1}/unwrapkey"),
        Some(json!({"alg": "RSA-OAEP-256", "value": w1["value"]})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        crypto::b64url_decode(u["value"].as_str().unwrap()).unwrap(),
        dek
    );

    // Disable: 403 KeyDisabled; enable again.
    let (s, b, _) = kv(
        &emu,
        t,
        Method::PATCH,
        &format!("/keys/kek/{v1}"),
        Some(json!({"attributes": {"enabled": false}})),
    )
    .await;
    assert_eq!(
        (s, b["attributes"]["enabled"].as_bool()),
        (200, Some(false))
    );
    let (s, b, _) = kv(
        &emu,
        t,
        Method::POST,
        &format!("/keys/kek/{v1}/unwrapkey"),
        Some(json!({"alg": "RSA-OAEP-256", "value": w1["value"]})),
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(b["error"]["innererror"]["code"], "KeyDisabled");
    kv(
        &emu,
        t,
        Method::PATCH,
        &format!("/keys/kek/{v1}"),
        Some(json!({"attributes": {"enabled": true}})),
    )
    .await;
    assert_eq!(
        kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/kek/{v1}/unwrapkey"),
            Some(json!({"alg": "RSA-OAEP-256", "value": w1["value"]}))
        )
        .await
        .0,
        200
    );

    // Delete: gone.
    let (s, b, _) = kv(&emu, t, Method::DELETE, "/keys/kek", None).await;
    assert_eq!(s, 200);
    assert!(b["recoveryId"].as_str().is_some());
    let (s, b, _) = kv(&emu, t, Method::GET, "/keys/kek", None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("KeyNotFound")));
    assert_eq!(
        kv(
            &emu,
            t,
            Method::POST,
            &format!("/keys/kek/{v1}/unwrapkey"),
            Some(json!({"alg": "RSA-OAEP-256", "value": w1["value"]}))
        )
        .await
        .0,
        404
    );
}

#[tokio::test]
async fn secrets_set_get_delete() {
    let emu = start().await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let t = Some(t.as_str());
    let (s, v1, _) = kv(
        &emu,
        t,
        Method::PUT,
        "/secrets/s",
        Some(json!({"value": "one"})),
    )
    .await;
    assert_eq!(s, 200);
    kv(
        &emu,
        t,
        Method::PUT,
        "/secrets/s",
        Some(json!({"value": "two", "contentType": "text/plain"})),
    )
    .await;
    assert_eq!(
        kv(&emu, t, Method::GET, "/secrets/s", None).await.1["value"],
        "two"
    );
    let version = v1["id"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        kv(&emu, t, Method::GET, &format!("/secrets/s/{version}"), None)
            .await
            .1["value"],
        "one"
    );
    assert_eq!(kv(&emu, t, Method::DELETE, "/secrets/s", None).await.0, 200);
    let (s, b, _) = kv(&emu, t, Method::GET, "/secrets/s", None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("SecretNotFound"))
    );
}

#[tokio::test]
async fn rbac_scopes_and_revocation_take_effect_at_once() {
    let emu = start().await;
    let t = access_token(&emu, OTHER_CLIENT, "other").await;
    let t = Some(t.as_str());
    let (_, w, _) = kv(
        &emu,
        Some(&access_token(&emu, APP_CLIENT, "app").await),
        Method::POST,
        "/keys/kek//wrapkey",
        Some(json!({"alg": "RSA-OAEP-256", "value": crypto::b64url(b"0123456789abcdef")})),
    )
    .await;
    let unwrap = json!({"alg": "RSA-OAEP-256", "value": w["value"]});
    let (s, b, _) = kv(
        &emu,
        t,
        Method::POST,
        "/keys/kek//unwrapkey",
        Some(unwrap.clone()),
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(b["error"]["innererror"]["code"], "ForbiddenByRbac");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Microsoft.KeyVault/vaults/keys/unwrap/action")
    );

    // The service-encryption role on this one key: unwrap yes, decrypt and other keys no.
    let ra = RoleAssignment {
        principal: OTHER_OID.into(),
        role: "Key Vault Crypto Service Encryption User".into(),
        scope: "/vaults/kv/keys/kek".into(),
    };
    emu.assign_role(ra.clone());
    assert_eq!(
        kv(
            &emu,
            t,
            Method::POST,
            "/keys/kek//unwrapkey",
            Some(unwrap.clone())
        )
        .await
        .0,
        200
    );
    assert_eq!(
        kv(
            &emu,
            t,
            Method::POST,
            "/keys/kek//decrypt",
            Some(unwrap.clone())
        )
        .await
        .0,
        403
    );
    assert_eq!(kv(&emu, t, Method::GET, "/keys/hsm", None).await.0, 403);
    assert_eq!(
        kv(&emu, t, Method::GET, "/secrets/kek-secret", None)
            .await
            .0,
        403
    );
    // Secrets User at vault scope reads secrets but cannot write them.
    emu.assign_role(RoleAssignment {
        principal: OTHER_OID.into(),
        role: "Key Vault Secrets User".into(),
        scope: "/vaults/kv".into(),
    });
    assert_eq!(
        kv(&emu, t, Method::GET, "/secrets/kek-secret", None)
            .await
            .1["value"],
        "c2VjcmV0"
    );
    assert_eq!(
        kv(
            &emu,
            t,
            Method::PUT,
            "/secrets/x",
            Some(json!({"value": "v"}))
        )
        .await
        .0,
        403
    );
    // Revoked: the very next call is refused, with the same token.
    assert!(emu.revoke_role(&ra));
    assert_eq!(
        kv(&emu, t, Method::POST, "/keys/kek//unwrapkey", Some(unwrap))
            .await
            .0,
        403
    );
}

#[tokio::test]
async fn faults_and_counters() {
    let emu = start().await;
    let token = access_token(&emu, APP_CLIENT, "app").await;
    let t = Some(token.as_str());
    emu.inject_fault(FaultSpec {
        route: "keyvault.get_key".into(),
        kind: FaultKind::Status {
            status: 429,
            retry_after: Some(2),
        },
        count: Some(1),
        duration_ms: None,
        client_id: None,
    });
    let (s, _, h) = kv(&emu, t, Method::GET, "/keys/kek", None).await;
    assert_eq!(s, 429);
    assert_eq!(h["retry-after"], "2");
    assert_eq!(
        kv(&emu, t, Method::GET, "/keys/kek", None).await.0,
        200,
        "a counted fault runs out"
    );
    emu.inject_fault(FaultSpec {
        route: "keyvault.get_key".into(),
        kind: FaultKind::Status {
            status: 503,
            retry_after: None,
        },
        count: None,
        duration_ms: Some(300),
        client_id: None,
    });
    assert_eq!(kv(&emu, t, Method::GET, "/keys/kek", None).await.0, 503);
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    assert_eq!(
        kv(&emu, t, Method::GET, "/keys/kek", None).await.0,
        200,
        "a timed fault expires"
    );
    emu.inject_fault(FaultSpec {
        route: "keyvault.get_key".into(),
        kind: FaultKind::Latency { ms: 300 },
        count: Some(1),
        duration_ms: None,
        client_id: None,
    });
    let start = std::time::Instant::now();
    assert_eq!(kv(&emu, t, Method::GET, "/keys/kek", None).await.0, 200);
    assert!(start.elapsed() >= std::time::Duration::from_millis(300));
    emu.inject_fault(FaultSpec {
        route: "*".into(),
        kind: FaultKind::Drop,
        count: Some(1),
        duration_ms: None,
        client_id: None,
    });
    let url = format!("{}/keys/kek?api-version=7.6", emu.vault_url("kv").unwrap());
    let dropped = async {
        http(&emu)
            .get(url)
            .bearer_auth(&token)
            .send()
            .await?
            .bytes()
            .await
    };
    assert!(dropped.await.is_err(), "the connection is dropped");
    emu.clear_faults();
    assert_eq!(emu.count("keyvault.get_key", Some(429)), 1);
    assert_eq!(emu.count("keyvault.get_key", Some(503)), 1);
    assert!(emu.count("keyvault.get_key", Some(200)) >= 3);
    assert_eq!(emu.count("entra.token", Some(200)), 1);
}

#[tokio::test]
async fn control_plane_only_with_admin() {
    let off = start_with(Options {
        config: config(),
        admin: false,
        ..Options::default()
    })
    .await;
    let r = http(&off)
        .get(format!("{}/_emulator/counters", off.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let emu = start().await;
    let c = http(&emu);
    let base = &emu.base_url;
    // A new identity with a federated credential and a role, all through the control plane.
    let r = c
        .post(format!("{base}/_emulator/identities"))
        .json(&json!({"tenant": TENANT, "name": "new", "client_id": "c-new", "object_id": "o-new"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let fic = json!({"name": "pod", "issuer": emu.issuer_url("cluster"), "subject": "system:serviceaccount:default:new"});
    assert_eq!(
        c.post(format!(
            "{base}/_emulator/identities/c-new/federated-credentials"
        ))
        .json(&fic)
        .send()
        .await
        .unwrap()
        .status(),
        204
    );
    let bad_role = json!({"principal": "o-new", "role": "Owner", "scope": "/vaults/kv"});
    assert_eq!(
        c.post(format!("{base}/_emulator/role-assignments"))
            .json(&bad_role)
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    let role = json!({"principal": "o-new", "role": "Key Vault Reader", "scope": "/vaults/kv"});
    assert_eq!(
        c.post(format!("{base}/_emulator/role-assignments"))
            .json(&role)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let minted: Value = c
        .post(format!("{base}/_emulator/issuers/cluster/token"))
        .json(&json!({"namespace": "default", "service_account": "new"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (s, body) = exchange(
        &emu,
        TENANT,
        "c-new",
        minted["token"].as_str().unwrap(),
        "https://vault.azure.net/.default",
    )
    .await;
    assert_eq!(s, 200);
    let token = body["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        kv(&emu, Some(&token), Method::GET, "/keys/kek", None)
            .await
            .0,
        200
    );
    // Remove the role, then the federated credential.
    assert_eq!(
        c.delete(format!("{base}/_emulator/role-assignments"))
            .json(&role)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        kv(&emu, Some(&token), Method::GET, "/keys/kek", None)
            .await
            .0,
        403
    );
    assert_eq!(
        c.delete(format!(
            "{base}/_emulator/identities/c-new/federated-credentials/pod"
        ))
        .send()
        .await
        .unwrap()
        .status(),
        204
    );
    let (s, body) = exchange(
        &emu,
        TENANT,
        "c-new",
        minted["token"].as_str().unwrap(),
        "https://vault.azure.net/.default",
    )
    .await;
    assert_eq!((s, aadsts(&body)), (400, 70021));
    let key: Value = c
        .post(format!("{base}/_emulator/vaults/kv/keys"))
        .json(&json!({"name": "added", "kty": "RSA", "size": 2048}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(key["version"].as_str().is_some());
    let fault = json!({"route": "entra.token", "kind": "status", "status": 503, "retry_after": null, "count": 1, "duration_ms": null});
    assert_eq!(
        c.post(format!("{base}/_emulator/faults"))
            .json(&fault)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        exchange(
            &emu,
            TENANT,
            APP_CLIENT,
            &sa_token(&emu, "cluster", "app"),
            "https://vault.azure.net/.default"
        )
        .await
        .0,
        503
    );
    let counters: Value = c
        .get(format!("{base}/_emulator/counters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters["entra.token"]["503"], 1);
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.json");
    let opts = || Options {
        config: config(),
        admin: true,
        state_file: Some(file.clone()),
        ..Options::default()
    };
    let emu = start_with(opts()).await;
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let (_, w, _) = kv(
        &emu,
        Some(&t),
        Method::POST,
        "/keys/kek//wrapkey",
        Some(json!({"alg": "RSA-OAEP-256", "value": crypto::b64url(b"persisted key bytes!")})),
    )
    .await;
    let ca = (emu.ca_cert_pem.clone(), emu.ca_key_pem.clone());
    drop(emu);
    let emu = start_with(Options {
        ca: Some(ca.clone()),
        ..opts()
    })
    .await;
    assert_eq!(emu.ca_cert_pem, ca.0, "the CA was reused");
    let t = access_token(&emu, APP_CLIENT, "app").await;
    let (s, u, _) = kv(
        &emu,
        Some(&t),
        Method::POST,
        "/keys/kek//unwrapkey",
        Some(json!({"alg": "RSA-OAEP-256", "value": w["value"]})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        crypto::b64url_decode(u["value"].as_str().unwrap()).unwrap(),
        b"persisted key bytes!"
    );
}

#[test]
fn the_example_config_parses() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/example-config.yaml"))
        .unwrap();
    let config = sealvol_azure_emulator::Config::parse(&text).unwrap();
    assert!(
        !config.tenants.is_empty()
            && !config.vaults.is_empty()
            && !config.role_assignments.is_empty()
    );
}

#[tokio::test]
async fn request_records_name_the_caller() {
    let emu = start().await;
    let app = access_token(&emu, APP_CLIENT, "app").await;
    let other = access_token(&emu, OTHER_CLIENT, "other").await;
    emu.clear_records();
    // The bearer challenge probe: recorded, with no identity.
    assert_eq!(kv(&emu, None, Method::GET, "/keys/kek", None).await.0, 401);
    assert_eq!(
        kv(&emu, Some(&app), Method::GET, "/keys/kek", None).await.0,
        200
    );
    assert_eq!(
        kv(
            &emu,
            Some(&other),
            Method::POST,
            "/keys/kek//unwrapkey",
            Some(json!({"alg": "RSA-OAEP-256", "value": "AAAA"}))
        )
        .await
        .0,
        403
    );
    // A faulted request still names who sent it.
    emu.inject_fault(FaultSpec {
        route: "keyvault.get_secret".into(),
        kind: FaultKind::Status {
            status: 503,
            retry_after: None,
        },
        count: Some(1),
        duration_ms: None,
        client_id: None,
    });
    assert_eq!(
        kv(&emu, Some(&app), Method::GET, "/secrets/kek-secret", None)
            .await
            .0,
        503
    );
    let records = emu.records();
    let vault = |route: &str, object: &str, oid: Option<&str>, client: Option<&str>, status| {
        sealvol_azure_emulator::RequestRecord {
            service: "keyvault".into(),
            vault: "kv".into(),
            route: route.into(),
            object: Some(object.into()),
            object_id: oid.map(str::to_string),
            client_id: client.map(str::to_string),
            tenant: oid.map(|_| TENANT.to_string()),
            status,
        }
    };
    assert_eq!(
        records,
        vec![
            vault("keyvault.get_key", "kek", None, None, 401),
            vault(
                "keyvault.get_key",
                "kek",
                Some(APP_OID),
                Some(APP_CLIENT),
                200
            ),
            vault(
                "keyvault.unwrap",
                "kek",
                Some(OTHER_OID),
                Some(OTHER_CLIENT),
                403
            ),
            vault(
                "keyvault.get_secret",
                "kek-secret",
                Some(APP_OID),
                Some(APP_CLIENT),
                503
            ),
        ]
    );
    // The control plane serves the same records, and forgets them.
    let c = http(&emu);
    let served: Vec<sealvol_azure_emulator::RequestRecord> = c
        .get(format!("{}/_emulator/records", emu.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, records);
    let r = c
        .delete(format!("{}/_emulator/records", emu.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(emu.records().is_empty());
    // Entra's own routes are not data-plane records.
    access_token(&emu, APP_CLIENT, "app").await;
    assert!(emu.records().is_empty());
}

#[tokio::test]
async fn entra_faults_look_like_entra_and_can_target_one_identity() {
    let emu = start().await;
    let scope = "https://vault.azure.net/.default";
    emu.inject_fault(FaultSpec {
        route: "entra.token".into(),
        kind: FaultKind::EntraError {
            status: 503,
            error: "temporarily_unavailable".into(),
            code: 90033,
            description: None,
        },
        count: None,
        duration_ms: None,
        client_id: Some(APP_CLIENT.into()),
    });
    let (s, b) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &sa_token(&emu, "cluster", "app"),
        scope,
    )
    .await;
    assert_eq!((s, aadsts(&b)), (503, 90033), "{b}");
    assert_eq!(b["error"], "temporarily_unavailable");
    assert!(
        b["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS90033: ")
    );
    for k in ["timestamp", "trace_id", "correlation_id", "error_uri"] {
        assert!(b[k].as_str().is_some(), "{k}: {b}");
    }
    // Another identity is not touched.
    let (s, _) = exchange(
        &emu,
        TENANT,
        OTHER_CLIENT,
        &sa_token(&emu, "cluster", "other"),
        scope,
    )
    .await;
    assert_eq!(s, 200);
    emu.clear_faults();
    // A plain status on Entra's route answers in Entra's shape too.
    emu.inject_fault(FaultSpec {
        route: "entra.*".into(),
        kind: FaultKind::Status {
            status: 429,
            retry_after: Some(3),
        },
        count: Some(1),
        duration_ms: None,
        client_id: None,
    });
    let (s, b) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &sa_token(&emu, "cluster", "app"),
        scope,
    )
    .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (429, Some("temporarily_unavailable"))
    );
    assert!(
        b["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS")
    );
    emu.inject_fault(FaultSpec {
        route: "entra.token".into(),
        kind: FaultKind::EntraError {
            status: 400,
            error: "invalid_client".into(),
            code: 70021,
            description: Some("No matching federated identity record found.".into()),
        },
        count: Some(1),
        duration_ms: None,
        client_id: None,
    });
    let (s, b) = exchange(
        &emu,
        TENANT,
        APP_CLIENT,
        &sa_token(&emu, "cluster", "app"),
        scope,
    )
    .await;
    assert_eq!((s, aadsts(&b)), (400, 70021));
    assert_eq!(b["error"], "invalid_client");
    assert!(
        b["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS70021: No matching federated identity record found.")
    );
    // Key Vault faults keep Key Vault's body, and can target one identity as well.
    let app = access_token(&emu, APP_CLIENT, "app").await;
    let other = access_token(&emu, OTHER_CLIENT, "other").await;
    emu.inject_fault(FaultSpec {
        route: "keyvault.*".into(),
        kind: FaultKind::Status {
            status: 503,
            retry_after: None,
        },
        count: None,
        duration_ms: None,
        client_id: Some(OTHER_CLIENT.into()),
    });
    let (s, b, _) = kv(&emu, Some(&other), Method::GET, "/keys/kek", None).await;
    assert_eq!(s, 503);
    assert!(b["error"]["code"].as_str().is_some(), "{b}");
    assert_eq!(
        kv(&emu, Some(&app), Method::GET, "/keys/kek", None).await.0,
        200
    );
    // Without a token the caller is unknown: a per-identity fault does not apply.
    assert_eq!(kv(&emu, None, Method::GET, "/keys/kek", None).await.0, 401);
}
