"""Fidelity of the emulator, checked with Microsoft's own Python SDK (azure-identity,
azure-keyvault-keys, azure-keyvault-secrets from PyPI): a client nobody here wrote must not be
able to tell the emulator from Entra ID and Key Vault for the calls sealvol makes.

Run by hack/test after the emulator is built; EMULATOR_BIN names the binary.
"""

import json
import os
import subprocess
import tempfile
import unittest
import urllib.request
import ssl

from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.identity import WorkloadIdentityCredential
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from azure.keyvault.secrets import SecretClient

TENANT = "72f988bf-0000-4000-8000-000000000001"
APP = {"client_id": "3d1c6a0e-1111-4111-8111-000000000001", "object_id": "9f0c2d4e-2222-4222-8222-000000000001"}
NOBODY = {"client_id": "3d1c6a0e-1111-4111-8111-000000000002", "object_id": "9f0c2d4e-2222-4222-8222-000000000002"}

CONFIG = {
    "tenants": [{
        "id": TENANT,
        "identities": [
            {"name": "app", **APP, "federated_credentials": [
                {"name": "pod", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:app"}]},
            {"name": "nobody", **NOBODY, "federated_credentials": [
                {"name": "pod", "issuer": "{emulator}/issuers/cluster", "subject": "system:serviceaccount:default:nobody"}]},
        ],
    }],
    "issuers": ["cluster"],
    "vaults": [{"name": "kv", "tenant": TENANT, "keys": [{"name": "kek", "kty": "RSA", "size": 2048}]}],
    "role_assignments": [
        {"principal": APP["object_id"], "role": "Key Vault Crypto Service Encryption User", "scope": "/vaults/kv/keys/kek"},
        {"principal": APP["object_id"], "role": "Key Vault Secrets Officer", "scope": "/vaults/kv"},
    ],
}


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
        # Then "vault NAME URL" per vault: each vault has its own port.
        _, name, cls.vault = cls.proc.stdout.readline().split()
        assert name == "kv", name
        # The SDKs' HTTP stacks (requests, for azure-core and MSAL) trust the emulator's CA.
        os.environ["REQUESTS_CA_BUNDLE"] = cls.ca

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(10)
        cls.dir.cleanup()

    def admin(self, path, body):
        ctx = ssl.create_default_context(cafile=self.ca)
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, context=ctx) as r:
            return json.loads(r.read() or b"{}")

    def counters(self):
        ctx = ssl.create_default_context(cafile=self.ca)
        with urllib.request.urlopen(self.base + "/_emulator/counters", context=ctx) as r:
            return json.loads(r.read())

    def credential(self, who, service_account):
        token = self.admin("/_emulator/issuers/cluster/token",
                           {"namespace": "default", "service_account": service_account})["token"]
        path = os.path.join(self.dir.name, service_account + ".token")
        with open(path, "w") as f:
            f.write(token)
        return WorkloadIdentityCredential(
            tenant_id=TENANT, client_id=who["client_id"], token_file_path=path,
            authority=self.base, disable_instance_discovery=True)

    def test_workload_identity_gets_a_key_vault_token(self):
        token = self.credential(APP, "app").get_token("https://vault.azure.net/.default")
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
        client = SecretClient(self.vault, self.credential(APP, "app"), verify_challenge_resource=False)
        client.set_secret("greeting", "v1")
        second = client.set_secret("greeting", "v2")
        self.assertEqual(client.get_secret("greeting").value, "v2")
        self.assertEqual(client.get_secret("greeting", second.properties.version).value, "v2")

    def test_no_federated_credential_is_aadsts70021(self):
        with self.assertRaises(ClientAuthenticationError) as caught:
            self.credential(APP, "stranger").get_token("https://vault.azure.net/.default")
        self.assertIn("AADSTS70021", str(caught.exception))

    def test_principal_without_a_role_gets_403(self):
        cred = self.credential(NOBODY, "nobody")
        with self.assertRaises(HttpResponseError) as caught:
            KeyClient(self.vault, cred, verify_challenge_resource=False).get_key("kek")
        self.assertEqual(caught.exception.status_code, 403)
        self.assertIn("ForbiddenByRbac", str(caught.exception))


if __name__ == "__main__":
    unittest.main(verbosity=2)
