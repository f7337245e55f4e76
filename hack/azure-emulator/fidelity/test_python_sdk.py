"""Fidelity of the emulator, checked with Microsoft's own Python SDK (azure-identity,
azure-keyvault-keys, azure-keyvault-secrets, azure-storage-blob from PyPI): a client nobody here
wrote must not be able to tell the emulator from Entra ID, Key Vault, Managed HSM and Blob
storage (Azurite behind the emulator's RBAC gateway) for the calls sealvol makes and the
behaviours its tests and docs/azure-setup.md rely on. Each expectation cites the Azure
documentation it follows or, where the documentation is silent, the recorded observation.

Run by hack/test after the emulator is built; EMULATOR_BIN names the binary. The Blob tests
need Azurite's azurite-blob (AZURITE_BLOB, else PATH; `npm install -g azurite@3.37.0`).
"""

import base64
import datetime
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import unittest
import urllib.error
import urllib.request

from azure.core.exceptions import (ClientAuthenticationError, HttpResponseError,
                                   ResourceExistsError, ResourceNotFoundError)
from azure.core.rest import HttpRequest
from azure.identity import WorkloadIdentityCredential
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from azure.keyvault.secrets import SecretClient
from azure.storage.blob import BlobBlock, ContainerClient

TENANT = "72f988bf-0000-4000-8000-000000000001"
APP = {"client_id": "3d1c6a0e-1111-4111-8111-000000000001", "object_id": "9f0c2d4e-2222-4222-8222-000000000001"}
NOBODY = {"client_id": "3d1c6a0e-1111-4111-8111-000000000002", "object_id": "9f0c2d4e-2222-4222-8222-000000000002"}
OFFICER = {"client_id": "3d1c6a0e-1111-4111-8111-000000000003", "object_id": "9f0c2d4e-2222-4222-8222-000000000003"}
VAULT = "https://vault.azure.net"
HSM = "https://managedhsm.azure.net"


def fic(sa):
    return [{"name": "pod", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:" + sa}]


CONFIG = {
    "tenants": [{
        "id": TENANT,
        "identities": [
            {"name": "app", **APP, "managed": True, "federated_credentials": fic("app")},
            {"name": "nobody", **NOBODY, "federated_credentials": fic("nobody")},
            {"name": "officer", **OFFICER, "managed": True, "federated_credentials": fic("officer")},
        ],
    }],
    "issuers": ["cluster"],
    "vaults": [
        {"name": "kv", "tenant": TENANT, "keys": [{"name": "kek", "kty": "RSA", "size": 2048}]},
        {"name": "kvp", "tenant": TENANT, "purge_protection": True},
    ],
    "hsms": [{"name": "mhsm", "tenant": TENANT, "keys": [{"name": "hsm-kek", "kty": "oct-HSM", "size": 256}]}],
    "role_assignments": [
        {"principal": APP["object_id"], "role": "Key Vault Crypto Service Encryption User", "scope": "/vaults/kv/keys/kek"},
        {"principal": APP["object_id"], "role": "Key Vault Secrets Officer", "scope": "/vaults/kv"},
        {"principal": APP["object_id"], "role": "Managed HSM Crypto Service Encryption User", "scope": "/hsms/mhsm/keys/hsm-kek"},
        {"principal": OFFICER["object_id"], "role": "Key Vault Administrator", "scope": "/vaults/kv"},
        {"principal": OFFICER["object_id"], "role": "Key Vault Administrator", "scope": "/vaults/kvp"},
        {"principal": OFFICER["object_id"], "role": "Managed HSM Crypto User", "scope": "/hsms/mhsm/keys"},
    ],
}

NO_RETRY = {"retry_total": 0}


def claims(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


class EmulatorFidelity(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        config = os.path.join(cls.dir.name, "config.json")
        with open(config, "w") as f:
            json.dump(CONFIG, f)
        cls.ca = os.path.join(cls.dir.name, "ca.pem")
        cls.proc = subprocess.Popen(
            [os.environ["EMULATOR_BIN"], "serve", "--config", config, "--ca-out", cls.ca, "--admin"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        cls.base = cls.proc.stdout.readline().strip()
        assert cls.base.startswith("https://"), cls.base
        # Then "vault NAME URL" per vault and "hsm NAME URL" per Managed HSM, each on its own port.
        cls.urls = {}
        for _ in range(len(CONFIG["vaults"]) + len(CONFIG["hsms"])):
            kind, name, url = cls.proc.stdout.readline().split()
            cls.urls[(kind, name)] = url
        cls.vault = cls.urls[("vault", "kv")]
        cls.hsm = cls.urls[("hsm", "mhsm")]
        # The SDKs' HTTP stacks (requests, for azure-core and MSAL) trust the emulator's CA.
        os.environ["REQUESTS_CA_BUNDLE"] = cls.ca
        cls.ctx = ssl.create_default_context(cafile=cls.ca)

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(10)
        cls.dir.cleanup()

    def tearDown(self):
        self.control("DELETE", "/_emulator/faults")

    # -- helpers -------------------------------------------------------------------------

    def control(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, context=self.ctx) as r:
            text = r.read()
            return json.loads(text) if text else None

    def admin(self, path, body):
        return self.control("POST", path, body)

    def counters(self):
        return self.control("GET", "/_emulator/counters")

    def raw(self, method, url, token=None, body=None):
        """A plain HTTPS call: (status, JSON body, headers)."""
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = "Bearer " + token
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.ctx) as r:
                return r.status, json.loads(r.read() or b"null"), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), e.headers

    def credential(self, who, service_account, **kwargs):
        token = self.admin("/_emulator/issuers/cluster/token",
                           {"namespace": "default", "service_account": service_account})["token"]
        path = os.path.join(self.dir.name, service_account + ".token")
        with open(path, "w") as f:
            f.write(token)
        return WorkloadIdentityCredential(
            tenant_id=TENANT, client_id=who["client_id"], token_file_path=path,
            authority=self.base, disable_instance_discovery=True, **kwargs)

    def keys(self, who=APP, sa="app", url=None, **kwargs):
        return KeyClient(url or self.vault, self.credential(who, sa), verify_challenge_resource=False, **kwargs)

    def secrets(self, who=APP, sa="app", url=None, **kwargs):
        return SecretClient(url or self.vault, self.credential(who, sa), verify_challenge_resource=False, **kwargs)

    def send(self, client, method, path, body=None):
        """A raw request through the SDK's own pipeline (challenge, token, no local crypto)."""
        req = HttpRequest(method, path + ("&" if "?" in path else "?") + "api-version=7.6", json=body)
        return client.send_request(req)

    # -- what sealvol does -----------------------------------------------------------------

    def test_workload_identity_gets_a_key_vault_token(self):
        token = self.credential(APP, "app").get_token(VAULT + "/.default")
        self.assertTrue(token.token.count(".") == 2)
        self.assertGreater(token.expires_on, 0)

    def test_wrap_and_unwrap_with_rsa_oaep_256(self):
        cred = self.credential(APP, "app")
        key = KeyClient(self.vault, cred, verify_challenge_resource=False).get_key("kek")
        self.assertEqual(key.key_type, "RSA")
        crypto = CryptographyClient(key, cred, verify_challenge_resource=False)
        dek = os.urandom(64)
        wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
        self.assertEqual(wrapped.key_id, key.id)
        self.assertEqual(crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key, dek)
        # Unwrap is a private-key operation: it went to the emulator, not a local provider.
        self.assertGreaterEqual(self.counters()["keyvault.unwrap"].get("200", 0), 1)

    def test_set_and_get_a_secret(self):
        client = self.secrets()
        client.set_secret("greeting", "v1")
        second = client.set_secret("greeting", "v2")
        self.assertEqual(client.get_secret("greeting").value, "v2")
        self.assertEqual(client.get_secret("greeting", second.properties.version).value, "v2")

    def test_no_federated_credential_is_aadsts70021(self):
        with self.assertRaises(ClientAuthenticationError) as caught:
            self.credential(APP, "stranger").get_token(VAULT + "/.default")
        self.assertIn("AADSTS70021", str(caught.exception))

    def test_principal_without_a_role_gets_403(self):
        with self.assertRaises(HttpResponseError) as caught:
            self.keys(NOBODY, "nobody").get_key("kek")
        self.assertEqual(caught.exception.status_code, 403)
        self.assertIn("ForbiddenByRbac", str(caught.exception))

    # -- 1. request records ----------------------------------------------------------------

    def test_records_name_each_callers_identity(self):
        # Not an Azure feature: the emulator's own record of whose token each request carried.
        # The SDK's first request is the bearer challenge probe, without a token
        # (https://learn.microsoft.com/azure/key-vault/general/authentication-requests-and-responses).
        # (The SDK caches a vault's challenge, so only its first client probes: the probe is
        # sent here by hand.)
        self.control("DELETE", "/_emulator/records")
        self.assertEqual(self.raw("GET", self.vault + "/keys/kek?api-version=7.6")[0], 401)
        self.keys().get_key("kek")
        with self.assertRaises(HttpResponseError):
            self.keys(NOBODY, "nobody").get_key("kek")
        records = self.control("GET", "/_emulator/records")
        gets = [r for r in records if r["route"] == "keyvault.get_key"]
        self.assertEqual(gets[0]["object_id"], None)
        self.assertEqual(gets[0]["status"], 401)
        known = [(r["object_id"], r["client_id"], r["status"]) for r in gets if r["object_id"]]
        self.assertEqual(known, [(APP["object_id"], APP["client_id"], 200),
                                 (NOBODY["object_id"], NOBODY["client_id"], 403)])
        self.assertEqual({(r["service"], r["vault"], r["object"], r["tenant"]) for r in gets if r["object_id"]},
                         {("keyvault", "kv", "kek", TENANT)})

    # -- 2. keys as Azure keeps them ---------------------------------------------------------

    def test_a_disabled_key_wraps_but_does_not_unwrap(self):
        # Observed on the live service (Azure/azure-sdk-for-python#45342): a disabled key
        # refuses unwrapKey, decrypt and sign with 403 KeyDisabled; wrapKey, encrypt and verify
        # still work. Calls go through the SDK pipeline to the service, not local crypto.
        officer = self.keys(OFFICER, "officer")
        officer.create_rsa_key("disabled-kek", size=2048)
        sig = self.send(officer, "POST", "/keys/disabled-kek//sign",
                        {"alg": "RS256", "value": b64(hashlib.sha256(b"m").digest())}).json()["value"]
        wrapped = self.send(officer, "POST", "/keys/disabled-kek//wrapkey",
                            {"alg": "RSA-OAEP-256", "value": b64(b"0123456789abcdef")}).json()["value"]
        props = officer.update_key_properties("disabled-kek", enabled=False)
        self.assertFalse(props.properties.enabled)
        for op, body in [("unwrapkey", {"alg": "RSA-OAEP-256", "value": wrapped}),
                         ("decrypt", {"alg": "RSA-OAEP-256", "value": wrapped}),
                         ("sign", {"alg": "RS256", "value": b64(hashlib.sha256(b"m").digest())})]:
            r = self.send(officer, "POST", f"/keys/disabled-kek//{op}", body)
            self.assertEqual(r.status_code, 403, op)
            self.assertEqual(r.json()["error"]["innererror"]["code"], "KeyDisabled")
        self.assertEqual(r.json()["error"]["message"], "Operation sign is not allowed on a disabled key.")
        for op, body in [("wrapkey", {"alg": "RSA-OAEP-256", "value": b64(b"0123456789abcdef")}),
                         ("encrypt", {"alg": "RSA-OAEP-256", "value": b64(b"x")}),
                         ("verify", {"alg": "RS256", "digest": b64(hashlib.sha256(b"m").digest()), "value": sig})]:
            r = self.send(officer, "POST", f"/keys/disabled-kek//{op}", body)
            self.assertEqual(r.status_code, 200, op)
        self.assertTrue(r.json()["value"])
        # The SDK's own CryptographyClient hits the same refusal on unwrap.
        crypto = officer.get_cryptography_client("disabled-kek")
        with self.assertRaises(HttpResponseError) as caught:
            crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, unb64(wrapped))
        self.assertEqual(caught.exception.status_code, 403)

    def test_expired_and_not_yet_valid_keys(self):
        # https://learn.microsoft.com/azure/key-vault/keys/about-keys-details#key-attributes
        # ("Date-time controlled operations"): outside nbf/exp, decrypt, unwrap and verify
        # still work; encrypt, wrap and sign are refused with 403.
        officer = self.keys(OFFICER, "officer")
        officer.create_rsa_key("dated", size=2048)
        wrapped = self.send(officer, "POST", "/keys/dated//wrapkey",
                            {"alg": "RSA-OAEP-256", "value": b64(b"0123456789abcdef")}).json()["value"]
        now = datetime.datetime.now(datetime.timezone.utc)
        for kwargs in [{"expires_on": now - datetime.timedelta(minutes=5)},
                       {"expires_on": now + datetime.timedelta(days=1), "not_before": now + datetime.timedelta(hours=1)}]:
            officer.update_key_properties("dated", **kwargs)
            for op in ["wrapkey", "encrypt"]:
                r = self.send(officer, "POST", f"/keys/dated//{op}",
                              {"alg": "RSA-OAEP-256", "value": b64(b"0123456789abcdef")})
                self.assertEqual(r.status_code, 403, (kwargs, op))
            r = self.send(officer, "POST", "/keys/dated//unwrapkey", {"alg": "RSA-OAEP-256", "value": wrapped})
            self.assertEqual(r.status_code, 200, kwargs)
            self.assertEqual(unb64(r.json()["value"]), b"0123456789abcdef")

    def test_key_operations_are_kept_and_enforced(self):
        # key_ops given at creation are returned and enforced: 403 KeyOperationForbidden,
        # "Operation encrypt is not permitted on this key." (observed: Azure/azure-sdk-for-net#11518).
        officer = self.keys(OFFICER, "officer")
        officer.create_rsa_key("wrap-only", size=2048, key_operations=["wrapKey", "unwrapKey"])
        self.assertEqual(sorted(officer.get_key("wrap-only").key_operations), ["unwrapKey", "wrapKey"])
        r = self.send(officer, "POST", "/keys/wrap-only//encrypt", {"alg": "RSA-OAEP-256", "value": b64(b"x")})
        self.assertEqual(r.status_code, 403)
        self.assertEqual(r.json()["error"]["innererror"]["code"], "KeyOperationForbidden")
        self.assertEqual(r.json()["error"]["message"], "Operation encrypt is not permitted on this key.")

    def test_names_are_checked(self):
        # Names match ^[0-9a-zA-Z-]{1,127}$
        # (https://learn.microsoft.com/azure/key-vault/general/about-keys-secrets-certificates#objects-identifiers-and-versioning).
        with self.assertRaises(HttpResponseError) as caught:
            self.keys(OFFICER, "officer").create_rsa_key("under_score")
        self.assertEqual(caught.exception.status_code, 400)
        with self.assertRaises(HttpResponseError) as caught:
            self.secrets().set_secret("a" * 128, "v")
        self.assertEqual(caught.exception.status_code, 400)

    def test_versions_are_listed_across_pages(self):
        # GET /secrets/{name}/versions and /keys/{name}/versions, at most 25 per page with a
        # nextLink (https://learn.microsoft.com/rest/api/keyvault/secrets/get-secret-versions/get-secret-versions,
        # https://learn.microsoft.com/rest/api/keyvault/keys/get-key-versions/get-key-versions).
        client = self.secrets()
        made = {client.set_secret("many", f"v{i}").properties.version for i in range(27)}
        listed = {p.version for p in client.list_properties_of_secret_versions("many")}
        self.assertEqual(listed, made)
        self.assertGreaterEqual(self.counters()["keyvault.list_secret_versions"].get("200", 0), 2)
        officer = self.keys(OFFICER, "officer")
        first = officer.create_rsa_key("two-versions", size=2048).properties.version
        second = officer.create_rsa_key("two-versions", size=2048).properties.version
        self.assertEqual({p.version for p in officer.list_properties_of_key_versions("two-versions")},
                         {first, second})

    def test_secret_update_and_a_disabled_secret(self):
        # PATCH updates enabled, contentType and exp
        # (https://learn.microsoft.com/rest/api/keyvault/secrets/update-secret/update-secret); a
        # disabled secret answers 403 "Operation get is not allowed on a disabled secret."
        # (innererror SecretDisabled); exp is informational for secrets
        # (https://learn.microsoft.com/azure/key-vault/secrets/about-secrets).
        client = self.secrets()
        client.set_secret("updated", "value")
        expires = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) - datetime.timedelta(minutes=1)
        props = client.update_secret_properties("updated", content_type="text/plain", expires_on=expires)
        self.assertEqual((props.content_type, props.expires_on), ("text/plain", expires))
        self.assertEqual(client.get_secret("updated").value, "value")
        client.update_secret_properties("updated", enabled=False)
        with self.assertRaises(HttpResponseError) as caught:
            client.get_secret("updated")
        self.assertEqual(caught.exception.status_code, 403)
        self.assertIn("SecretDisabled", str(caught.exception))

    # -- 3. Entra faults shaped like Entra -------------------------------------------------

    def test_an_injected_entra_fault_reads_as_entras_error(self):
        # Entra's error body (https://learn.microsoft.com/entra/identity-platform/reference-error-codes):
        # error, error_description "AADSTSnnnnn: ...", error_codes; 90033 is one of the
        # transient codes. Limited to one identity, the other still gets tokens.
        self.admin("/_emulator/faults", {"route": "entra.token", "kind": "entra_error", "status": 503,
                                         "error": "temporarily_unavailable", "code": 90033,
                                         "count": None, "duration_ms": None, "client_id": APP["client_id"]})
        with self.assertRaises(ClientAuthenticationError) as caught:
            self.credential(APP, "app", **NO_RETRY).get_token(VAULT + "/.default")
        self.assertIn("AADSTS90033", str(caught.exception))
        self.assertIn("temporarily_unavailable", str(caught.exception))
        self.credential(OFFICER, "officer").get_token(VAULT + "/.default")
        self.control("DELETE", "/_emulator/faults")
        self.admin("/_emulator/faults", {"route": "entra.token", "kind": "entra_error", "status": 400,
                                         "error": "invalid_client", "code": 70021,
                                         "count": 1, "duration_ms": None})
        with self.assertRaises(ClientAuthenticationError) as caught:
            self.credential(APP, "app").get_token(VAULT + "/.default")
        self.assertIn("AADSTS70021", str(caught.exception))
        # A Key Vault fault keeps Key Vault's error body.
        self.admin("/_emulator/faults", {"route": "keyvault.get_key", "kind": "status", "status": 503,
                                         "retry_after": None, "count": None, "duration_ms": None,
                                         "client_id": APP["client_id"]})
        with self.assertRaises(HttpResponseError) as caught:
            self.keys(**NO_RETRY).get_key("kek")
        self.assertEqual(caught.exception.status_code, 503)
        self.assertIsNotNone(caught.exception.error.code)

    # -- 4. Managed HSM as its own service ---------------------------------------------------

    def test_managed_hsm_wraps_with_a256kw_and_takes_only_its_own_tokens(self):
        # Managed HSM: oct-HSM keys and A256KW
        # (https://learn.microsoft.com/azure/key-vault/managed-hsm/about-keys-details); the
        # challenge names https://managedhsm.azure.net
        # (https://learn.microsoft.com/azure/key-vault/managed-hsm/authorize-azure-resource-manager);
        # local RBAC roles (https://learn.microsoft.com/azure/key-vault/managed-hsm/built-in-roles).
        client = self.keys(url=self.hsm)
        key = client.get_key("hsm-kek")
        self.assertEqual(key.key_type, "oct-HSM")
        self.assertTrue(key.id.startswith(self.hsm + "/keys/hsm-kek/"))
        self.assertIsNone(key.key.k, "symmetric key material never leaves the HSM")
        # Wrap and unwrap on the service, through the SDK's pipeline. (The SDK's
        # CryptographyClient would not call the service here: given an oct key without "k" its
        # local AES provider makes up a random key and wraps locally, in azure-keyvault-keys
        # 4.11.3, SymmetricKey.from_jwk.)
        dek = os.urandom(32)
        r = self.send(client, "POST", "/keys/hsm-kek//wrapkey", {"alg": KeyWrapAlgorithm.aes_256.value, "value": b64(dek)})
        self.assertEqual(r.status_code, 200, r.text())
        self.assertEqual(r.json()["kid"], key.id)
        r = self.send(client, "POST", "/keys/hsm-kek//unwrapkey", {"alg": "A256KW", "value": r.json()["value"]})
        self.assertEqual(unb64(r.json()["value"]), dek)
        self.assertGreaterEqual(self.counters()["managedhsm.unwrap"].get("200", 0), 1)
        status, _, headers = self.raw("GET", self.hsm + "/keys/hsm-kek?api-version=7.6")
        self.assertEqual(status, 401)
        self.assertIn('resource="https://managedhsm.azure.net"', headers["www-authenticate"])
        vault_token = self.credential(APP, "app").get_token(VAULT + "/.default").token
        hsm_token = self.credential(APP, "app").get_token(HSM + "/.default").token
        self.assertEqual(self.raw("GET", self.hsm + "/keys/hsm-kek?api-version=7.6", vault_token)[0], 401)
        self.assertEqual(self.raw("GET", self.vault + "/keys/kek?api-version=7.6", hsm_token)[0], 401)
        # Crypto User on /hsms/mhsm/keys creates oct-HSM keys; the Service Encryption User on
        # one key reaches no other.
        self.keys(OFFICER, "officer", url=self.hsm).create_oct_key("second", size=256, hardware_protected=True)
        with self.assertRaises(HttpResponseError) as caught:
            client.get_key("second")
        self.assertEqual(caught.exception.status_code, 403)
        # A vault refuses symmetric keys (https://learn.microsoft.com/azure/key-vault/keys/about-keys-details).
        with self.assertRaises(HttpResponseError) as caught:
            self.keys(OFFICER, "officer").create_oct_key("sym", size=256, hardware_protected=True)
        self.assertEqual(caught.exception.status_code, 400)

    # -- 5. Entra as it answers ----------------------------------------------------------------

    def test_entra_issues_v1_tokens_for_one_known_resource(self):
        # AADSTS500011 invalid_resource for an unknown resource
        # (https://learn.microsoft.com/entra/identity-platform/reference-error-codes); several
        # resources in one client-credentials request: AADSTS70011 (observed:
        # Azure/azure-sdk-for-net#9076); v1.0 access tokens
        # (https://learn.microsoft.com/entra/identity-platform/access-token-claims-reference).
        with self.assertRaises(ClientAuthenticationError) as caught:
            self.credential(APP, "app").get_token("https://nowhere.example/.default")
        self.assertIn("AADSTS500011", str(caught.exception))
        with self.assertRaises(ClientAuthenticationError) as caught:
            self.credential(APP, "app").get_token(VAULT + "/.default", "https://storage.azure.com/.default")
        self.assertIn("AADSTS70011", str(caught.exception))
        token = self.credential(APP, "app").get_token(VAULT + "/.default")
        c = claims(token.token)
        self.assertEqual((c["iss"], c["ver"], c["aud"]), (f"https://sts.windows.net/{TENANT}/", "1.0", VAULT))
        self.assertEqual((c["appid"], c["oid"], c["tid"]), (APP["client_id"], APP["object_id"], TENANT))
        # A managed identity's token lives about a day
        # (https://learn.microsoft.com/entra/identity/managed-identities-azure-resources/managed-identities-faq).
        self.assertGreater(token.expires_on - time.time(), 23 * 3600)
        app_token = self.credential(NOBODY, "nobody").get_token(VAULT + "/.default")
        self.assertLess(app_token.expires_on - time.time(), 3700)

    # -- 6. soft delete and purge protection ---------------------------------------------------

    def test_soft_delete_recover_purge_and_purge_protection(self):
        # https://learn.microsoft.com/azure/key-vault/general/soft-delete-overview: deleted
        # objects are kept (get, list, recover, purge); their name cannot be reused (409, as
        # observed in Azure/azure-rest-api-specs#9222); purge protection refuses purge (403, as
        # observed in microsoft/AzureTRE#1951).
        client = self.secrets()
        client.set_secret("doomed", "v")
        client.begin_delete_secret("doomed").wait()
        self.assertEqual(client.get_deleted_secret("doomed").name, "doomed")
        self.assertIn("doomed", [d.name for d in client.list_deleted_secrets()])
        with self.assertRaises(ResourceExistsError):
            client.set_secret("doomed", "again")
        client.begin_recover_deleted_secret("doomed").wait()
        self.assertEqual(client.get_secret("doomed").value, "v")
        client.begin_delete_secret("doomed").wait()
        client.purge_deleted_secret("doomed")
        with self.assertRaises(ResourceNotFoundError):
            client.get_deleted_secret("doomed")
        client.set_secret("doomed", "reborn")
        keys = self.keys(OFFICER, "officer")
        keys.create_rsa_key("temp", size=2048)
        keys.begin_delete_key("temp").wait()
        self.assertEqual(keys.get_deleted_key("temp").name, "temp")
        keys.purge_deleted_key("temp")
        protected = self.keys(OFFICER, "officer", url=self.urls[("vault", "kvp")])
        protected.create_rsa_key("kept", size=2048)
        protected.begin_delete_key("kept").wait()
        with self.assertRaises(HttpResponseError) as caught:
            protected.purge_deleted_key("kept")
        self.assertEqual(caught.exception.status_code, 403)
        self.assertIn("purge protection", str(caught.exception))
        self.assertEqual(protected.begin_recover_deleted_key("kept").result().name, "kept")

    # -- 7. RBAC propagation delay ---------------------------------------------------------------

    def test_role_assignments_take_effect_after_the_propagation_delay(self):
        # Role assignment changes can take minutes to take effect
        # (https://learn.microsoft.com/azure/role-based-access-control/troubleshooting#symptom---role-assignment-changes-are-not-being-detected).
        self.control("PUT", "/_emulator/propagation-delay", {"ms": 1500})
        try:
            client = self.keys(NOBODY, "nobody")
            role = {"principal": NOBODY["object_id"], "role": "Key Vault Reader", "scope": "/vaults/kv"}
            self.control("POST", "/_emulator/role-assignments", role)
            with self.assertRaises(HttpResponseError) as caught:
                client.get_key("kek")
            self.assertEqual(caught.exception.status_code, 403)
            time.sleep(1.6)
            self.assertEqual(client.get_key("kek").name, "kek")
            self.control("DELETE", "/_emulator/role-assignments", role)
            self.assertEqual(client.get_key("kek").name, "kek")
            time.sleep(1.6)
            with self.assertRaises(HttpResponseError):
                client.get_key("kek")
        finally:
            self.control("PUT", "/_emulator/propagation-delay", {"ms": 0})

    # -- 8. storage -------------------------------------------------------------------------------

    def test_storage_tokens_and_blob_data_roles(self):
        # Tokens for https://storage.azure.com, and the Storage Blob Data roles
        # (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/storage).
        token = self.credential(APP, "app").get_token("https://storage.azure.com/.default")
        self.assertEqual(claims(token.token)["aud"], "https://storage.azure.com")
        self.control("POST", "/_emulator/role-assignments",
                     {"principal": APP["object_id"], "role": "Storage Blob Data Contributor",
                      "scope": "/storageAccounts/devstoreaccount1/containers/backups"})
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.control("POST", "/_emulator/role-assignments",
                         {"principal": APP["object_id"], "role": "Storage Blob Data Contributor",
                          "scope": "/vaults/kv"})
        self.assertEqual(caught.exception.code, 400)


class BlobGatewayFidelity(unittest.TestCase):
    """Blob storage through the emulator's gateway, as azure-storage-blob sees it."""

    WRITER = {"client_id": "3d1c6a0e-1111-4111-8111-0000000000b1", "object_id": "9f0c2d4e-2222-4222-8222-0000000000b1"}
    READER = {"client_id": "3d1c6a0e-1111-4111-8111-0000000000b2", "object_id": "9f0c2d4e-2222-4222-8222-0000000000b2"}
    SCOPE = "/storageAccounts/devstoreaccount1/containers/backups"

    @classmethod
    def setUpClass(cls):
        azurite = os.environ.get("AZURITE_BLOB") or shutil.which("azurite-blob")
        if not azurite:
            raise AssertionError("the Blob tests need Azurite's azurite-blob on PATH or in AZURITE_BLOB: "
                                 "install it with `npm install -g azurite@3.37.0`")
        cls.dir = tempfile.TemporaryDirectory()
        config = {
            "tenants": [{"id": TENANT, "identities": [
                {"name": "writer", **cls.WRITER, "federated_credentials": fic("writer")},
                {"name": "reader", **cls.READER, "federated_credentials": fic("reader")},
                {"name": "nobody", **NOBODY, "federated_credentials": fic("nobody")},
            ]}],
            "issuers": ["cluster"],
            "storage_accounts": [{"name": "devstoreaccount1", "containers": ["backups"]}],
            "role_assignments": [
                {"principal": cls.WRITER["object_id"], "role": "Storage Blob Data Contributor", "scope": cls.SCOPE},
                {"principal": cls.READER["object_id"], "role": "Storage Blob Data Reader", "scope": cls.SCOPE},
            ],
        }
        path = os.path.join(cls.dir.name, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        cls.ca = os.path.join(cls.dir.name, "ca.pem")
        cls.proc = subprocess.Popen(
            [os.environ["EMULATOR_BIN"], "serve", "--config", path, "--ca-out", cls.ca, "--admin",
             "--azurite", azurite],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        cls.base = cls.proc.stdout.readline().strip()
        assert cls.base.startswith("https://"), cls.base
        # No vaults or HSMs here: the next line is the storage account's.
        kind, name, cls.account_url = cls.proc.stdout.readline().split()
        assert (kind, name) == ("blob", "devstoreaccount1"), (kind, name)
        os.environ["REQUESTS_CA_BUNDLE"] = cls.ca
        cls.ctx = ssl.create_default_context(cafile=cls.ca)

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(10)
        cls.dir.cleanup()

    def tearDown(self):
        self.control("DELETE", "/_emulator/faults")

    def control(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, context=self.ctx) as r:
            text = r.read()
            return json.loads(text) if text else None

    def container(self, who, sa):
        credential = None
        if who:
            token = self.control("POST", "/_emulator/issuers/cluster/token",
                                 {"namespace": "default", "service_account": sa})["token"]
            path = os.path.join(self.dir.name, sa + ".token")
            with open(path, "w") as f:
                f.write(token)
            credential = WorkloadIdentityCredential(
                tenant_id=TENANT, client_id=who["client_id"], token_file_path=path,
                authority=self.base, disable_instance_discovery=True)
        return ContainerClient(self.account_url, "backups", credential=credential, retry_total=0)

    def test_the_writer_stages_commits_reads_and_deletes(self):
        c = self.container(self.WRITER, "writer")
        blob = c.get_blob_client("snapshots/pvc-1/0001")
        ids = [base64.b64encode(b"block-%04d" % i).decode() for i in range(2)]
        blob.stage_block(ids[0], b"first half, ")
        blob.stage_block(ids[1], b"second")
        blob.commit_block_list([BlobBlock(block_id=i) for i in ids])
        committed, _ = blob.get_block_list("all")
        self.assertEqual([b.id for b in committed], ids)
        self.assertEqual(blob.download_blob().readall(), b"first half, second")
        self.assertIn("snapshots/pvc-1/0001", [b.name for b in c.list_blobs()])
        blob.delete_blob()
        with self.assertRaises(ResourceNotFoundError):
            blob.download_blob()

    def test_roles_are_enforced(self):
        # 403 AuthorizationPermissionMismatch when the role does not grant the data action
        # (https://learn.microsoft.com/rest/api/storageservices/blob-service-error-codes).
        self.container(self.WRITER, "writer").upload_blob("r", b"data", overwrite=True)
        reader = self.container(self.READER, "reader")
        self.assertEqual(reader.download_blob("r").readall(), b"data")
        for attempt in (lambda: reader.upload_blob("r2", b"x"), lambda: reader.delete_blob("r"),
                        lambda: self.container(NOBODY, "nobody").download_blob("r").readall()):
            with self.assertRaises(HttpResponseError) as caught:
                attempt()
            self.assertEqual((caught.exception.status_code, caught.exception.error_code),
                             (403, "AuthorizationPermissionMismatch"))

    def test_anonymous_requests_get_a_bearer_challenge(self):
        # 401 NoAuthenticationInformation with a WWW-Authenticate Bearer challenge
        # (https://learn.microsoft.com/rest/api/storageservices/authorize-with-azure-active-directory).
        with self.assertRaises(ClientAuthenticationError) as caught:
            self.container(None, None).download_blob("r").readall()
        e = caught.exception
        self.assertEqual((e.status_code, e.error_code), (401, "NoAuthenticationInformation"))
        self.assertIn("resource_id=https://storage.azure.com", e.response.headers["WWW-Authenticate"])

    def test_injected_server_busy(self):
        self.control("POST", "/_emulator/faults",
                     {"route": "blob.put_block", "kind": "status", "status": 503, "retry_after": None,
                      "count": 1, "duration_ms": None})
        blob = self.container(self.WRITER, "writer").get_blob_client("busy")
        with self.assertRaises(HttpResponseError) as caught:
            blob.stage_block(base64.b64encode(b"x").decode(), b"x")
        self.assertEqual((caught.exception.status_code, caught.exception.error_code), (503, "ServerBusy"))
        self.assertEqual(self.control("GET", "/_emulator/counters")["blob.put_block"], {"503": 1})


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


if __name__ == "__main__":
    unittest.main(verbosity=2)
