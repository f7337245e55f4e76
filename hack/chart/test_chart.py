"""The Helm chart, linted and rendered with Helm's own engine (helm-python-sdk), for the default
values and every example values file, and the rendered objects checked: the CSIDriver's fields,
resources on every container, the DaemonSet mounting what the driver's flags point at, the
sidecars dialling the driver's socket, and deploy/ up to date with the chart. (That each object
is a valid Kubernetes object, with no unknown field, is checked in Rust against k8s-openapi:
tests/manifests.rs.)
"""

import glob
import os
import re
import sys
import unittest

import helm_python as helm
import yaml

sys.path.insert(0, os.path.dirname(__file__))
import render  # noqa: E402

ERROR = 3

GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
PLACEHOLDER_ID = "00000000-0000-0000-0000-000000000000"
EMULATOR_CONFIG = os.path.join(render.ROOT, "hack", "azure-emulator", "example-config.yaml")


def emulator_test_ids():
    """The client and object ids of the identities the emulator's example configuration defines
    (its tenant id is not among them: a tenant id in an example must be the placeholder)."""
    with open(EMULATOR_CONFIG) as fh:
        config = yaml.safe_load(fh)
    ids = set()
    for tenant in config.get("tenants", []):
        for identity in tenant.get("identities", []):
            ids.update(str(identity[k]).lower() for k in ("client_id", "object_id") if k in identity)
    return ids


def objects(values):
    return [d for d in yaml.safe_load_all(render.render(values)) if d]


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def arg(args, flag):
    """The values of `--flag=value` arguments."""
    return [a.split("=", 1)[1] for a in args if a.startswith(f"--{flag}=")]


class Chart(unittest.TestCase):
    def test_lint_has_no_errors(self):
        for name, values in render.example_values():
            for kube in ["v1.34.0", "v1.35.0"]:
                report = helm.lint(render.CHART, values, kube_version=kube)
                errors = [m for m in report["messages"] if m["severity"] >= ERROR] + report["errors"]
                self.assertEqual(errors, [], f"{name} on {kube}")

    def test_schema_refuses_what_the_driver_would(self):
        chart = helm.Chart.load(render.CHART)
        for bad in [{"pools": []}, {"pools": [{"name": "Bad Name", "dir": "/x"}]}, {"pools": [{"name": "p", "dir": "relative"}]},
                    {"reauthorizeInterval": "five minutes"}, {"sidecars": {"registrar": {"image": "no-tag"}}}, {"unknownKey": 1}]:
            with self.assertRaises(helm.HelmValuesError, msg=str(bad)):
                chart.validate_schema(chart.merge_values(bad))

    def test_csidriver(self):
        for name, values in render.example_values():
            (driver,) = by_kind(objects(values), "CSIDriver")
            spec = driver["spec"]
            self.assertEqual(spec["attachRequired"], False)
            self.assertEqual(spec["podInfoOnMount"], True)
            self.assertEqual(spec["requiresRepublish"], True)
            self.assertEqual(spec["storageCapacity"], True)
            self.assertEqual(spec["fsGroupPolicy"], "File")
            self.assertEqual(spec["volumeLifecycleModes"], ["Persistent", "Ephemeral"])
            self.assertEqual(spec["tokenRequests"], [{"audience": "api://AzureADTokenExchange"}])
            # The default follows the cluster version (Helm's default is recent); minimal.yaml
            # turns it off for an older cluster.
            self.assertEqual(spec.get("serviceAccountTokenInSecrets", False), name != "minimal", name)

    def test_every_container_has_requests_and_limits(self):
        for name, values in render.example_values():
            (ds,) = by_kind(objects(values), "DaemonSet")
            for c in ds["spec"]["template"]["spec"]["containers"]:
                for kind in ("requests", "limits"):
                    self.assertIn("cpu", c["resources"][kind], f"{name}/{c['name']}")
                    self.assertIn("memory", c["resources"][kind], f"{name}/{c['name']}")

    def test_the_daemonset_mounts_what_the_flags_point_at(self):
        for name, values in render.example_values():
            objs = objects(values)
            (ds,) = by_kind(objs, "DaemonSet")
            pod = ds["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            driver = next(c for c in pod["containers"] if c["name"] == "sealvol")
            mounts = {m["mountPath"]: m for m in driver["volumeMounts"]}
            args = driver["args"]
            self.assertTrue(driver["securityContext"]["privileged"])
            kubelet = arg(args, "kubelet-dir")[0]
            self.assertEqual(mounts[kubelet]["mountPropagation"], "Bidirectional", name)
            self.assertEqual(volumes[mounts[kubelet]["name"]]["hostPath"]["path"], kubelet)
            state = arg(args, "state-dir")[0]
            self.assertEqual(mounts[state]["mountPropagation"], "Bidirectional", name)
            self.assertIn("/dev", mounts)
            for pool in arg(args, "pool"):
                target = pool.split("=", 1)[1]
                if target.startswith("device:"):
                    for dev in target[len("device:"):].split(","):
                        self.assertTrue(dev.startswith("/dev/"), dev)
                else:
                    self.assertIn(target, mounts, f"{name}: pool {pool} is not mounted")
                    self.assertEqual(volumes[mounts[target]["name"]]["hostPath"]["path"], target)
            # The driver's socket is in the directory kubelet gives the plugin.
            self.assertEqual(arg(args, "endpoint"), ["unix:///csi/csi.sock"])
            plugin_dir = volumes[mounts["/csi"]["name"]]["hostPath"]["path"]
            driver_name = arg(args, "driver-name")[0]
            self.assertEqual(plugin_dir, f"{kubelet}/plugins/{driver_name}")
            (csidriver,) = by_kind(objs, "CSIDriver")
            self.assertEqual(csidriver["metadata"]["name"], driver_name)
            for sc in by_kind(objs, "StorageClass"):
                self.assertEqual(sc["provisioner"], driver_name)
                self.assertEqual(sc["volumeBindingMode"], "WaitForFirstConsumer")

    def test_sidecars_dial_the_drivers_socket(self):
        for name, values in render.example_values():
            (ds,) = by_kind(objects(values), "DaemonSet")
            pod = ds["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            driver = next(c for c in pod["containers"] if c["name"] == "sealvol")
            kubelet = arg(driver["args"], "kubelet-dir")[0]
            driver_name = arg(driver["args"], "driver-name")[0]
            names = [c["name"] for c in pod["containers"]]
            self.assertIn("csi-provisioner", names)
            self.assertEqual("csi-resizer" in names, values.get("expansion", {}).get("enabled", True), name)
            for c in pod["containers"]:
                if c["name"] == "sealvol":
                    continue
                self.assertEqual(arg(c["args"], "csi-address"), ["/csi/csi.sock"], f"{name}/{c['name']}")
                csi_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/csi")
                self.assertEqual(volumes[csi_mount["name"]]["hostPath"]["path"], f"{kubelet}/plugins/{driver_name}")
                self.assertRegex(c["image"], r":v[0-9.]+$", "sidecar images are pinned")
            registrar = next(c for c in pod["containers"] if c["name"] == "node-driver-registrar")
            self.assertEqual(arg(registrar["args"], "kubelet-registration-path"), [f"{kubelet}/plugins/{driver_name}/csi.sock"])
            provisioner = next(c for c in pod["containers"] if c["name"] == "csi-provisioner")
            for flag in ["--node-deployment", "--enable-capacity", "--strict-topology", "--extra-create-metadata", "--feature-gates=Topology=true"]:
                self.assertIn(flag, provisioner["args"])

    def test_rbac_is_minimal(self):
        for name, values in render.example_values():
            (role,) = by_kind(objects(values), "ClusterRole")
            sa_rules = [r for r in role["rules"] if "serviceaccounts" in r["resources"]]
            if values.get("serviceAccountLookup", True):
                self.assertEqual(sa_rules, [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]}])
            else:
                self.assertEqual(sa_rules, [], f"{name}: no access to ServiceAccounts without the lookup")
            for r in role["rules"]:
                self.assertNotIn("*", r["verbs"])
                self.assertNotIn("secrets", r["resources"], "the driver reads no Kubernetes secret")

    def test_examples_name_no_real_looking_ids(self):
        # A tenant or client id copied from an example must fail as a placeholder, not reach a
        # real tenant (72f988bf-86f1-41af-91ab-2d7cd011db47 is Microsoft's own: AADSTS700016).
        allowed = {PLACEHOLDER_ID} | emulator_test_ids()
        paths = sorted(glob.glob(os.path.join(render.ROOT, "deploy", "**", "*.yaml"), recursive=True)
                       + glob.glob(os.path.join(render.CHART, "examples", "*.yaml"))
                       + [os.path.join(render.CHART, "values.yaml")])
        self.assertTrue(any("/deploy/examples/" in p for p in paths), "deploy/examples/ was scanned")
        for path in paths:
            with open(path) as fh:
                for n, line in enumerate(fh, 1):
                    for found in GUID.findall(line):
                        self.assertIn(found.lower(), allowed,
                                      f"{os.path.relpath(path, render.ROOT)}:{n}: {found} looks like a real id; "
                                      f"use {PLACEHOLDER_ID}")

    def test_resizer_elects_a_leader_with_a_lease_role(self):
        for name, values in render.example_values():
            objs = objects(values)
            (ds,) = by_kind(objs, "DaemonSet")
            containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
            roles, bindings = by_kind(objs, "Role"), by_kind(objs, "RoleBinding")
            if not values.get("expansion", {}).get("enabled", True):
                self.assertNotIn("csi-resizer", containers, name)
                self.assertEqual((roles, bindings), ([], []), name)
                continue
            resizer = containers["csi-resizer"]
            self.assertIn("--leader-election", resizer["args"])
            self.assertEqual(arg(resizer["args"], "leader-election-namespace"), ["$(NAMESPACE)"])
            env = {e["name"]: e for e in resizer["env"]}
            self.assertEqual(env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace")
            (role,) = roles
            self.assertEqual(role["metadata"]["namespace"], render.NAMESPACE)
            self.assertEqual(role["rules"], [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                              "verbs": ["get", "watch", "list", "create", "update", "patch", "delete"]}])
            (binding,) = bindings
            self.assertEqual(binding["roleRef"]["name"], role["metadata"]["name"])
            self.assertEqual(binding["subjects"], [{"kind": "ServiceAccount", "name": ds["spec"]["template"]["spec"]["serviceAccountName"],
                                                    "namespace": render.NAMESPACE}])

    def test_extra_args_and_env_per_container(self):
        names = {"sealvol": "sealvol", "registrar": "node-driver-registrar", "provisioner": "csi-provisioner",
                 "resizer": "csi-resizer", "livenessprobe": "liveness-probe"}
        values = {"extraArgs": {k: [f"--extra-{k}=1"] for k in names},
                  "extraEnv": {k: [{"name": f"EXTRA_{k.upper()}", "value": "v"},
                                   {"name": "FROM_FIELD", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}] for k in names}}
        (ds,) = by_kind(objects(values), "DaemonSet")
        containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
        for key, cname in names.items():
            c = containers[cname]
            self.assertEqual(c["args"][-1], f"--extra-{key}=1", cname)
            env = {e["name"]: e for e in c["env"]}
            self.assertEqual(env[f"EXTRA_{key.upper()}"], {"name": f"EXTRA_{key.upper()}", "value": "v"}, cname)
            self.assertIn("valueFrom", env["FROM_FIELD"], cname)
        # The chart's own environment stays.
        self.assertIn("NODE_NAME", [e["name"] for e in containers["sealvol"]["env"]])
        # Defaults add nothing: no env on the sidecars that need none.
        (ds,) = by_kind(objects({}), "DaemonSet")
        containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
        self.assertNotIn("env", containers["node-driver-registrar"])
        self.assertNotIn("env", containers["liveness-probe"])

    def test_azure_ca_bundle_from_a_configmap_or_a_secret(self):
        for source, field in [("configMap", "configMap"), ("secret", "secret")]:
            values = {"azure": {"caBundle": {source: "corp-ca", "key": "bundle.pem"}}}
            (ds,) = by_kind(objects(values), "DaemonSet")
            pod = ds["spec"]["template"]["spec"]
            driver = next(c for c in pod["containers"] if c["name"] == "sealvol")
            (ca_file,) = arg(driver["args"], "ca-file")
            mount = next(m for m in driver["volumeMounts"] if m["name"] == "azure-ca")
            self.assertTrue(mount["readOnly"])
            self.assertEqual(ca_file, f"{mount['mountPath']}/bundle.pem")
            volume = next(v for v in pod["volumes"] if v["name"] == "azure-ca")
            ref = volume[field]
            self.assertEqual(ref["name" if field == "configMap" else "secretName"], "corp-ca")
            self.assertEqual(ref["items"], [{"key": "bundle.pem", "path": "bundle.pem"}])
        for name, values in render.example_values():
            (ds,) = by_kind(objects(values), "DaemonSet")
            pod = ds["spec"]["template"]["spec"]
            driver = next(c for c in pod["containers"] if c["name"] == "sealvol")
            self.assertEqual(arg(driver["args"], "ca-file"), [], name)
            self.assertNotIn("azure-ca", [v["name"] for v in pod["volumes"]], name)

    def test_keyvault_challenge_verification(self):
        for setting, expected in [({}, "true"), ({"azure": {"verifyChallenge": False}}, "false")]:
            (ds,) = by_kind(objects(setting), "DaemonSet")
            driver = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "sealvol")
            self.assertEqual(arg(driver["args"], "keyvault-verify-challenge"), [expected])

    def test_schema_refuses_bad_new_values(self):
        chart = helm.Chart.load(render.CHART)
        for bad in [{"azure": {"caBundle": {"configMap": "a", "secret": "b"}}},
                    {"azure": {"caBundle": {"configMap": "Bad_Name"}}},
                    {"azure": {"caBundle": {"key": "../etc/passwd"}}},
                    {"azure": {"verifyChallenge": "no"}},
                    {"extraArgs": {"kubelet": ["--x"]}}, {"extraArgs": {"sealvol": "--x"}},
                    {"extraEnv": {"sealvol": [{"value": "no name"}]}}, {"extraEnv": {"sealvol": [{"name": "A", "vlaue": "typo"}]}}]:
            with self.assertRaises(helm.HelmValuesError, msg=str(bad)):
                chart.validate_schema(chart.merge_values(bad))
        for good in [{"azure": {"caBundle": {"secret": "corp-ca"}}}, {"extraEnv": {"sealvol": [{"name": "HTTPS_PROXY", "value": "http://p:3128"}]}}]:
            chart.validate_schema(chart.merge_values(good))

    def test_mount_propagation_requirements_are_documented(self):
        with open(os.path.join(render.CHART, "values.yaml")) as fh:
            text = fh.read()
        for phrase in ["Bidirectional", "shared", "HostToContainer", "slave"]:
            self.assertIn(phrase, text)

    def test_deploy_is_up_to_date_with_the_chart(self):
        for path, text in render.outputs().items():
            with open(os.path.join(render.ROOT, path)) as fh:
                self.assertEqual(fh.read(), text, f"{path} is out of date: run python3 hack/chart/render.py")


if __name__ == "__main__":
    unittest.main(verbosity=2)
