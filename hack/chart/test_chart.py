"""The Helm chart, linted and rendered with Helm's own engine (helm-python-sdk), for the default
values and every example values file, and the rendered objects checked: the CSIDriver's fields,
resources on every container, the DaemonSet mounting what the driver's flags point at, the
sidecars dialling the driver's socket with flags their pinned releases document, the RBAC rules
exactly, the cleanup controller's Deployment (its flags, an unprivileged pod, a ServiceAccount
and exact RBAC of its own, off with cleanup.enabled: false), csi-snapshotter on every node and
its exact rules (off with snapshots.enabled: false), VolumeSnapshotClasses from values, snapshot
backups to Azure Blob storage (the driver's flags, its own projected ServiceAccount token and the
ServiceAccount's client-id annotation, all off without backup.urls; a class's backupURL one of
backup.urls), the admission policy evaluated on sample requests (cel-python), alerts and
dashboard checked against the metrics the driver registers (src/metrics.rs), and deploy/ up to
date with the chart. (That each object in deploy/ is a valid Kubernetes object, with no unknown
field, is checked in Rust against k8s-openapi: tests/manifests.rs. k8s-openapi has no snapshot
types, so the VolumeSnapshotClasses are rendered apart, into deploy/snapshot-classes/, and
checked here.)
"""

import glob
import json
import os
import re
import sys
import tempfile
import unittest

import celpy
import helm_python as helm
import yaml
from celpy import celtypes

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


# The names the chart gives the node plugin's objects (its ServiceAccount, RBAC, DaemonSet) and
# the cleanup controller's, for the release render.py renders.
NODE, CLEANUP = "sealvol", "sealvol-cleanup"


def named(objs, kind, name):
    """The one object of `kind` called `name`."""
    (obj,) = [o for o in by_kind(objs, kind) if o["metadata"]["name"] == name]
    return obj


def cleanup_objects(objs):
    """The cleanup controller's objects: everything named after it."""
    return [o for o in objs if o["metadata"]["name"] == CLEANUP]


def selects(selector, labels):
    """Whether a label selector's matchLabels select these labels."""
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def arg(args, flag):
    """The values of `--flag=value` arguments."""
    return [a.split("=", 1)[1] for a in args if a.startswith(f"--{flag}=")]


def lint_log(values, kube_version):
    """What Helm writes to the process's stderr while linting (its Go logger bypasses Python)."""
    with tempfile.TemporaryFile() as out:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            helm.lint(render.CHART, values, kube_version=kube_version)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        return out.read().decode(errors="replace")


def containers(objs):
    (ds,) = by_kind(objs, "DaemonSet")
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


# The sidecars the chart pins, and every flag it passes each of them, with where that release
# documents the flag. Checked by hand against the sources named here (no image can be pulled
# here); a new flag or a new tag fails test_sidecar_flags_are_documented until it is added.
#   node-driver-registrar v2.18.0: CHANGELOG/CHANGELOG-2.18.md (dependencies Kubernetes 1.37);
#     README "Required arguments": --csi-address, --kubelet-registration-path; it calls no API.
#   external-provisioner v6.4.0: CHANGELOG/CHANGELOG-6.4.md (k8s.io/kubernetes v1.36.3, needs
#     1.24+ for CSIStorageCapacity v1); flags in cmd/csi-provisioner/csi-provisioner.go and the
#     README ("Storage capacity arguments", "Distributed provisioning"). Topology has been on by
#     default since v5.0.0 (CHANGELOG-5.0.md), so the chart no longer passes its feature gate.
#   external-resizer v2.3.0: CHANGELOG/CHANGELOG-2.3.md (Kubernetes 1.37 dependencies); flags in
#     cmd/csi-resizer/main.go and the README (--leader-election, --leader-election-namespace,
#     --handle-volume-inuse-error: "false ... to save costs associated with watching all pods").
#   livenessprobe v2.20.0: CHANGELOG/CHANGELOG-2.20.md (Kubernetes 1.37 dependencies); flags in
#     cmd/livenessprobe/main.go (--csi-address, --http-endpoint).
#   external-snapshotter (csi-snapshotter) v8.7.0: CHANGELOG/CHANGELOG-8.7.md (k8s.io client libraries
#     v0.36.2; "Enabled the VolumeGroupSnapshot feature gate", #1475, which keeps the
#     gate for this release and honours it set to false). Flags in cmd/csi-snapshotter/main.go:
#     --csi-address, --node-deployment ("deploying the sidecar controller together with a CSI
#     driver on nodes"; needs the NODE_NAME variable, and exits when --leader-election is set
#     too), --extra-create-metadata, --timeout ("for any RPCs to the CSI driver", default 1m),
#     --feature-gates (CSIVolumeGroupSnapshot), and klog's --v. With --extra-create-metadata the
#     sidecar takes the VolumeSnapshot's name and namespace from the content's volumeSnapshotRef
#     (pkg/sidecar-controller/snapshot_controller.go, createSnapshotWrapper), so it reads no
#     VolumeSnapshot. The distributed mode itself: kubernetes-csi/external-snapshotter#585.
# None of them has a maximum Kubernetes version, so all run on 1.35 and 1.36.
SIDECARS = {
    "node-driver-registrar": ("registry.k8s.io/sig-storage/csi-node-driver-registrar", "v2.18.0",
                              {"--csi-address", "--kubelet-registration-path"}),
    "csi-provisioner": ("registry.k8s.io/sig-storage/csi-provisioner", "v6.4.0",
                        {"--csi-address", "--node-deployment", "--enable-capacity", "--capacity-ownerref-level", "--timeout",
                         "--strict-topology", "--extra-create-metadata"}),
    "csi-resizer": ("registry.k8s.io/sig-storage/csi-resizer", "v2.3.0",
                    {"--csi-address", "--leader-election", "--leader-election-namespace", "--handle-volume-inuse-error"}),
    "csi-snapshotter": ("registry.k8s.io/sig-storage/csi-snapshotter", "v8.7.0",
                        {"--csi-address", "--node-deployment", "--extra-create-metadata", "--timeout", "--feature-gates", "--v"}),
    "liveness-probe": ("registry.k8s.io/sig-storage/livenessprobe", "v2.20.0", {"--csi-address", "--http-endpoint"}),
}

# The rules csi-snapshotter and external-provisioner need on snapshot.storage.k8s.io, all and only
# with snapshots.enabled; templates/rbac.yaml says who needs which. A verb added there (create or
# delete on contents, which the upstream rbac.yaml grants for group snapshots) fails here.
SNAPSHOT_RULES = [
    {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshotclasses"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshotcontents"],
     "verbs": ["get", "list", "watch", "update", "patch"]},
    {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshotcontents/status"], "verbs": ["update", "patch"]},
    {"apiGroups": ["snapshot.storage.k8s.io"], "resources": ["volumesnapshots"], "verbs": ["get", "list", "watch", "update"]},
]

MANIFESTS_RS = os.path.join(render.ROOT, "tests", "manifests.rs")


def snapshots_on(values):
    return values.get("snapshots", {}).get("enabled", True)


def manifests_rs_kinds():
    """The (apiVersion, kind) pairs tests/manifests.rs round-trips through k8s-openapi; it
    refuses any other kind it finds in deploy/sealvol.yaml, deploy/rendered/ or deploy/examples/."""
    with open(MANIFESTS_RS) as fh:
        return set(re.findall(r'\("([a-z0-9./]+)", "([A-Za-z]+)"\) =>', fh.read()))

METRICS_RS = os.path.join(render.ROOT, "src", "metrics.rs")
MONITORING = os.path.join(render.CHART, "monitoring")


def registered_families(source):
    """The metrics the driver exports, from src/metrics.rs: for each `registry.register("name",
    ..., m.field.clone())`, the family name (with the registry's prefix) and the sample names a
    scrape shows, by the field's type: prometheus-client adds `_total` to a Counter and
    `_bucket`, `_sum`, `_count` to a Histogram (queried by its bare name too); a Gauge is as it
    is."""
    (prefix,) = re.findall(r'Registry::with_prefix\("([a-z_]+)"\)', source)
    kinds = dict(re.findall(r"pub\(crate\) (\w+): (?:Family<[^>]*?\b)?(Counter|Gauge|Histogram)\b", source))
    families = {}
    for name, field in re.findall(r'registry\.register\(\s*"([a-z_]+)",\s*"[^"]*",\s*m\.(\w+)\.clone\(\)', source):
        base = f"{prefix}_{name}"
        families[base] = {"Counter": {f"{base}_total"},
                          "Histogram": {base, f"{base}_bucket", f"{base}_sum", f"{base}_count"},
                          "Gauge": {base}}[kinds[field]]
    return families


def registered_metrics(source):
    return set().union(*registered_families(source).values())


def metric_names(text):
    return set(re.findall(r"\bsealvol_[a-z0-9_]+\b", text))


def rule_exprs(objs):
    (rule,) = by_kind(objs, "PrometheusRule")
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def dashboard_exprs(objs):
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    dash = json.loads(cm["data"]["sealvol.json"])
    return {t["expr"] for p in dash["panels"] for t in p["targets"]}


class Admission:
    """A ValidatingAdmissionPolicy evaluated as the apiserver does for one request, with cel-python:
    match conditions, then the variables in order, then each validation."""

    def __init__(self, spec):
        self.spec = spec
        self.env = celpy.Environment()

    def _eval(self, expression, activation):
        return self.env.program(self.env.compile(expression)).evaluate(activation)

    def admit(self, request):
        """(allowed, message)."""
        act = {"request": celpy.json_to_cel(request), "object": celpy.json_to_cel(request.get("object")),
               "oldObject": celpy.json_to_cel(request.get("oldObject"))}
        for condition in self.spec["matchConditions"]:
            if not self._eval(condition["expression"], act):
                return True, "not matched"
        act["variables"] = variables = celtypes.MapType({})
        for v in self.spec["variables"]:
            variables[celtypes.StringType(v["name"])] = self._eval(v["expression"], act)
        for v in self.spec["validations"]:
            if not self._eval(v["expression"], act):
                return False, str(v.get("message") or self._eval(v["messageExpression"], act))
        return True, "allowed"


def sealvol_pv(node, driver="sealvol.csi.io", capacity="1Gi", claim="data"):
    """A PV as external-provisioner writes it for a volume on `node` (strict topology)."""
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pvc-1", "finalizers": []},
          "spec": {"capacity": {"storage": capacity}, "claimRef": {"namespace": "app", "name": claim},
                   "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                       {"key": "topology.sealvol.io/node", "operator": "In", "values": [node]}]}]}}}}
    if driver:
        pv["spec"]["csi"] = {"driver": driver, "volumeHandle": "sv-0123456789abcdef0123456789abcdef"}
    else:
        pv["spec"]["hostPath"] = {"path": "/"}
    return pv


def lost(pv, why="node started without it"):
    """`pv` marked lost by a node plugin (sealvol.io/lost)."""
    pv = json.loads(json.dumps(pv))
    pv["metadata"].setdefault("annotations", {})["sealvol.io/lost"] = why
    return pv


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
            objs = objects(values)
            workloads = by_kind(objs, "DaemonSet") + by_kind(objs, "Deployment")
            self.assertEqual(len(workloads), 2, name)
            for c in (c for w in workloads for c in w["spec"]["template"]["spec"]["containers"]):
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
            self.assertEqual("csi-snapshotter" in names, snapshots_on(values), name)
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
            for flag in ["--node-deployment", "--enable-capacity", "--strict-topology", "--extra-create-metadata"]:
                self.assertIn(flag, provisioner["args"])
            # On by default since v5.0.0; a removed gate would stop the container at start.
            self.assertEqual(arg(provisioner["args"], "feature-gates"), [], name)

    def test_sidecar_flags_are_documented(self):
        for name, values in render.example_values():
            for cname, c in containers(objects(values)).items():
                if cname == "sealvol":
                    continue
                image, tag, documented = SIDECARS[cname]
                self.assertEqual(c["image"], f"{image}:{tag}", f"{name}/{cname}: update SIDECARS after checking its flags")
                passed = {a.split("=", 1)[0] for a in c["args"]}
                self.assertLessEqual(passed, documented, f"{name}/{cname}: a flag not checked against {tag}")
        # The resizer's trivial resizer never reports a volume in use: no cluster-wide pod watch.
        resizer = containers(objects({}))["csi-resizer"]
        self.assertEqual(arg(resizer["args"], "handle-volume-inuse-error"), ["false"])

    def test_rbac_is_exactly_what_the_containers_call(self):
        # Who needs each rule is in templates/rbac.yaml; a rule added there fails here until
        # it is listed with its reason.
        cluster = [
            ([""], ["persistentvolumes"], ["get", "list", "watch", "create", "delete", "patch"]),
            ([""], ["persistentvolumeclaims"], ["get", "list", "watch", "update"]),
            ([""], ["persistentvolumeclaims/status"], ["patch"]),
            (["storage.k8s.io"], ["storageclasses"], ["get", "list", "watch"]),
            ([""], ["nodes"], ["get", "list", "watch"]),
            (["storage.k8s.io"], ["csinodes"], ["get", "list", "watch"]),
            ([""], ["events"], ["create", "patch"]),
        ]
        for name, values in render.example_values():
            objs = objects(values)
            role = named(objs, "ClusterRole", NODE)
            expected = [{"apiGroups": g, "resources": r, "verbs": v} for g, r, v in cluster]
            if values.get("serviceAccountLookup", True):
                expected.append({"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]})
            if snapshots_on(values):
                expected += SNAPSHOT_RULES
            self.assertEqual(role["rules"], expected, name)
            for r in role["rules"] + named(objs, "Role", NODE)["rules"]:
                self.assertNotIn("*", r["verbs"])
                self.assertNotIn("secrets", r["resources"], "the driver reads no Kubernetes secret")
                if "pods" in r["resources"]:
                    self.assertEqual(r["verbs"], ["get"], "nothing lists or watches pods")

    def test_namespaced_rules_stay_in_the_release_namespace(self):
        for name, values in render.example_values():
            objs = objects(values)
            role = named(objs, "Role", NODE)
            binding = named(objs, "RoleBinding", NODE)
            (ds,) = by_kind(objs, "DaemonSet")
            self.assertEqual(role["metadata"]["namespace"], render.NAMESPACE)
            self.assertEqual(binding["roleRef"]["name"], role["metadata"]["name"])
            self.assertEqual(binding["subjects"], [{"kind": "ServiceAccount", "name": ds["spec"]["template"]["spec"]["serviceAccountName"],
                                                    "namespace": render.NAMESPACE}])
            expected = [
                {"apiGroups": ["storage.k8s.io"], "resources": ["csistoragecapacities"],
                 "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                {"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": [ds["metadata"]["name"]], "verbs": ["get"]},
            ]
            if values.get("expansion", {}).get("enabled", True):
                expected += [
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                     "resourceNames": ["external-resizer-sealvol-csi-io"], "verbs": ["get", "update"]},
                ]
            self.assertEqual(role["rules"], expected, name)
        # The lease name follows the driver name as csi-lib-utils sanitizes it.
        role = named(objects({"driverName": "local.sealvol.example"}), "Role", NODE)
        self.assertIn(["external-resizer-local-sealvol-example"], [r.get("resourceNames") for r in role["rules"]])

    def test_eviction_is_granted_only_when_asked(self):
        eviction = {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]}
        for name, values in render.example_values():
            role = named(objects(values), "ClusterRole", NODE)
            self.assertNotIn(eviction, role["rules"], f"{name}: off by default")
            self.assertFalse(any("pods/eviction" in r["resources"] for r in role["rules"]), name)
        role = named(objects({"evictRevokedPods": True}), "ClusterRole", NODE)
        self.assertIn(eviction, role["rules"])
        # The driver evicts through the API client it only has with the ServiceAccount lookup.
        with self.assertRaisesRegex(helm.HelmRenderError, "serviceAccountLookup"):
            objects({"evictRevokedPods": True, "serviceAccountLookup": False})
        chart = helm.Chart.load(render.CHART)
        with self.assertRaises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values({"evictRevokedPods": "yes"}))

    def test_admission_policy_is_off_by_default(self):
        for name, values in render.example_values():
            objs = objects(values)
            self.assertEqual(by_kind(objs, "ValidatingAdmissionPolicy") + by_kind(objs, "ValidatingAdmissionPolicyBinding"), [], name)

    def test_admission_policy_pins_each_node_to_its_own_volumes(self):
        objs = objects({"admissionPolicy": {"enabled": True}})
        (policy,) = by_kind(objs, "ValidatingAdmissionPolicy")
        (binding,) = by_kind(objs, "ValidatingAdmissionPolicyBinding")
        self.assertEqual(binding["spec"]["policyName"], policy["metadata"]["name"])
        self.assertEqual(binding["spec"]["validationActions"], ["Deny"])
        self.assertEqual(policy["spec"]["failurePolicy"], "Fail")
        (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
        self.assertEqual(rule["resources"], ["persistentvolumes"])
        self.assertEqual(set(rule["operations"]), {"CREATE", "UPDATE", "DELETE"})
        policy = Admission(policy["spec"])
        node = {"username": f"system:serviceaccount:{render.NAMESPACE}:sealvol",
                "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}

        def req(op, user=node, new=None, old=None):
            return {"operation": op, "userInfo": user, "object": new, "oldObject": old}

        allowed = [
            req("CREATE", new=sealvol_pv("node-a")),
            req("DELETE", old=sealvol_pv("node-a")),
            # The resizer holds the lease on one node and grows any node's PV; the provisioner
            # patches finalizers.
            req("UPDATE", new=sealvol_pv("node-b", capacity="2Gi"), old=sealvol_pv("node-b")),
            # Anyone else is not this policy's business.
            req("CREATE", user={"username": "system:serviceaccount:kube-system:other", "extra": {}}, new=sealvol_pv("x", driver=None)),
        ]
        refused = [
            (req("CREATE", new=sealvol_pv("node-b")), "pinned to that node"),
            (req("DELETE", old=sealvol_pv("node-b")), "pinned to that node"),
            (req("CREATE", new=sealvol_pv("node-a", driver=None)), "of driver sealvol.csi.io"),
            (req("CREATE", new=sealvol_pv("node-a", driver="disk.csi.azure.com")), "of driver sealvol.csi.io"),
            (req("UPDATE", new=sealvol_pv("node-a"), old=sealvol_pv("node-b")), "not its source, node affinity or claim"),
            (req("UPDATE", new=sealvol_pv("node-b", claim="other"), old=sealvol_pv("node-b")), "not its source, node affinity or claim"),
            (req("CREATE", user={"username": node["username"], "extra": {}}, new=sealvol_pv("node-a")), "no node name"),
            # The lost mark makes the cleanup controller delete the PV: another node's is not
            # this node's to set, change or remove.
            (req("UPDATE", new=lost(sealvol_pv("node-b")), old=sealvol_pv("node-b")), "mark lost"),
            (req("UPDATE", new=lost(sealvol_pv("node-b"), "other"), old=lost(sealvol_pv("node-b"))), "mark lost"),
            (req("UPDATE", new=sealvol_pv("node-b"), old=lost(sealvol_pv("node-b"))), "mark lost"),
        ]
        allowed += [
            req("UPDATE", new=lost(sealvol_pv("node-a")), old=sealvol_pv("node-a")),
            req("UPDATE", new=sealvol_pv("node-a"), old=lost(sealvol_pv("node-a"))),
            # Another node's PV keeps its mark through an unrelated update.
            req("UPDATE", new=lost(sealvol_pv("node-b", capacity="2Gi")), old=lost(sealvol_pv("node-b"))),
        ]
        for request in allowed:
            self.assertEqual(policy.admit(request)[0], True, request)
        for request, why in refused:
            ok, message = policy.admit(request)
            self.assertFalse(ok, request)
            self.assertIn(why, message)

    def test_admission_policy_needs_kubernetes_1_30(self):
        # Rendering offline always sees a recent cluster, so the version check is seen through
        # lint, which takes a version; in lint mode Helm only logs a template's `fail`.
        values = {"admissionPolicy": {"enabled": True}}
        self.assertIn("admissionPolicy needs Kubernetes 1.30+", lint_log(values, "v1.29.0"))
        self.assertNotIn("admissionPolicy needs", lint_log(values, "v1.30.0"))

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

    def test_resizer_elects_a_leader(self):
        for name, values in render.example_values():
            objs = objects(values)
            cs = containers(objs)
            role = named(objs, "Role", NODE)
            leases = [r for r in role["rules"] if "leases" in r["resources"]]
            if not values.get("expansion", {}).get("enabled", True):
                self.assertNotIn("csi-resizer", cs, name)
                self.assertEqual(leases, [], name)
                continue
            resizer = cs["csi-resizer"]
            self.assertIn("--leader-election", resizer["args"])
            self.assertEqual(arg(resizer["args"], "leader-election-namespace"), ["$(NAMESPACE)"])
            env = {e["name"]: e for e in resizer["env"]}
            self.assertEqual(env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace")
            self.assertTrue(leases, name)

    def test_cleanup_deployment_by_default(self):
        for name, values in render.example_values():
            objs = objects(values)
            deploy = named(objs, "Deployment", CLEANUP)
            self.assertEqual(deploy["metadata"]["namespace"], render.NAMESPACE)
            self.assertEqual(deploy["spec"]["replicas"], 1, name)
            pod = deploy["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            driver = containers(objs)["sealvol"]
            (csidriver,) = by_kind(objs, "CSIDriver")
            # The node plugin's image, and its log settings, the same way.
            self.assertEqual((c["image"], c["imagePullPolicy"]), (driver["image"], driver["imagePullPolicy"]), name)
            self.assertEqual(c["args"], [
                "cleanup",
                f"--driver-name={csidriver['metadata']['name']}",
                "--interval=60s",
                "--node-gone-grace=5m",
                "--lease-namespace=$(POD_NAMESPACE)",
                "--lease-name=sealvol-cleanup",
                "--identity=$(POD_NAME)",
                f"--log-format={arg(driver['args'], 'log-format')[0]}",
                f"--log-level={arg(driver['args'], 'log-level')[0]}",
            ], name)
            self.assertEqual(c["env"], [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            ], name)
            self.assertEqual(c["resources"], {"requests": {"cpu": "10m", "memory": "32Mi"},
                                              "limits": {"cpu": "100m", "memory": "64Mi"}}, name)
            # Nothing to serve, nothing of the host; scheduled anywhere, not where the DaemonSet is.
            for key in ("ports", "livenessProbe", "readinessProbe", "volumeMounts"):
                self.assertNotIn(key, c, name)
            for key in ("volumes", "hostNetwork", "hostPID", "nodeSelector", "tolerations", "affinity", "priorityClassName"):
                self.assertNotIn(key, pod, name)
        # Every value reaches the pod.
        objs = objects({"driverName": "local.sealvol.example", "log": {"format": "text", "level": "debug"},
                        "cleanup": {"replicas": 2, "interval": "30s", "nodeGoneGrace": "1h", "leaseName": "other-lease",
                                    "priorityClassName": "system-cluster-critical", "nodeSelector": {"pool": "system"},
                                    "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
                                    "affinity": {"nodeAffinity": {}}},
                        "extraArgs": {"cleanup": ["--extra=1"]}, "extraEnv": {"cleanup": [{"name": "EXTRA", "value": "v"}]}})
        deploy = named(objs, "Deployment", CLEANUP)
        pod = deploy["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        self.assertEqual(deploy["spec"]["replicas"], 2)
        for flag, value in [("driver-name", "local.sealvol.example"), ("interval", "30s"), ("node-gone-grace", "1h"),
                            ("lease-name", "other-lease"), ("log-format", "text"), ("log-level", "debug")]:
            self.assertEqual(arg(c["args"], flag), [value], flag)
        self.assertEqual(c["args"][-1], "--extra=1")
        self.assertEqual(c["env"][-1], {"name": "EXTRA", "value": "v"})
        self.assertEqual(pod["priorityClassName"], "system-cluster-critical")
        self.assertEqual(pod["nodeSelector"], {"pool": "system"})
        self.assertEqual(pod["tolerations"], [{"key": "CriticalAddonsOnly", "operator": "Exists"}])
        self.assertEqual(pod["affinity"], {"nodeAffinity": {}})
        (role,) = [r for r in named(objs, "Role", CLEANUP)["rules"] if "resourceNames" in r]
        self.assertEqual(role["resourceNames"], ["other-lease"])
        # The node plugin's DaemonSet takes none of these.
        ds_pod = by_kind(objs, "DaemonSet")[0]["spec"]["template"]["spec"]
        self.assertEqual(ds_pod["priorityClassName"], "system-node-critical")
        self.assertEqual(ds_pod["nodeSelector"], {"sealvol.io/local-storage": "true"})

    def test_cleanup_can_be_turned_off(self):
        for name, values in render.example_values():
            on = objects(values)
            off = objects({**values, "cleanup": {"enabled": False}})
            self.assertEqual(len(cleanup_objects(on)), 6, name)
            self.assertEqual({o["kind"] for o in cleanup_objects(on)},
                             {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment"})
            self.assertEqual(cleanup_objects(off), [], name)
            self.assertEqual(by_kind(off, "Deployment"), [], name)
            # Nothing else changes.
            self.assertEqual(off, [o for o in on if o["metadata"]["name"] != CLEANUP], name)

    def test_cleanup_rbac_is_exactly_what_it_calls(self):
        # Why each rule is there is in templates/cleanup.yaml; a verb or resource added there
        # fails here until it is listed.
        cluster = [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
            {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["list", "delete", "patch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        ]
        for name, values in render.example_values():
            objs = objects(values)
            self.assertEqual(named(objs, "ClusterRole", CLEANUP)["rules"], cluster, name)
            subject = [{"kind": "ServiceAccount", "name": CLEANUP, "namespace": render.NAMESPACE}]
            for kind, role_kind in [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")]:
                binding = named(objs, kind, CLEANUP)
                self.assertEqual(binding["roleRef"], {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": CLEANUP})
                self.assertEqual(binding["subjects"], subject, f"{name}/{kind}")
            # Its ServiceAccount is bound to nothing else.
            for b in by_kind(objs, "ClusterRoleBinding") + by_kind(objs, "RoleBinding"):
                if b["metadata"]["name"] != CLEANUP:
                    self.assertNotIn(CLEANUP, [s["name"] for s in b["subjects"]], b["metadata"]["name"])
        # The node plugin keeps list and patch on PVs: at start it annotates the ones it lost.
        pv = next(r for r in named(objects({}), "ClusterRole", NODE)["rules"] if r["resources"] == ["persistentvolumes"])
        self.assertLessEqual({"list", "patch"}, set(pv["verbs"]))

    def test_cleanup_lease_is_the_only_one_it_may_renew(self):
        for values, lease in [({}, "sealvol-cleanup"), ({"cleanup": {"leaseName": "sealvol-cleanup-b"}}, "sealvol-cleanup-b")]:
            objs = objects(values)
            role = named(objs, "Role", CLEANUP)
            self.assertEqual(role["metadata"]["namespace"], render.NAMESPACE)
            self.assertEqual(named(objs, "RoleBinding", CLEANUP)["metadata"]["namespace"], render.NAMESPACE)
            self.assertEqual(role["rules"], [
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease], "verbs": ["get", "update"]},
            ])
            (c,) = named(objs, "Deployment", CLEANUP)["spec"]["template"]["spec"]["containers"]
            self.assertEqual(arg(c["args"], "lease-name"), [lease])
            # The lease lives where the Role grants it: the pod's own namespace.
            self.assertEqual(arg(c["args"], "lease-namespace"), ["$(POD_NAMESPACE)"])

    def test_cleanup_runs_unprivileged(self):
        for name, values in render.example_values():
            pod = named(objects(values), "Deployment", CLEANUP)["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            # What the container says wins over the pod's defaults.
            effective = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            self.assertIs(effective["runAsNonRoot"], True, name)
            self.assertNotEqual(effective.get("runAsUser", 0), 0, name)
            self.assertIs(effective["readOnlyRootFilesystem"], True, name)
            self.assertIs(effective["allowPrivilegeEscalation"], False, name)
            self.assertEqual(effective["capabilities"], {"drop": ["ALL"]}, name)
            self.assertEqual(effective["seccompProfile"], {"type": "RuntimeDefault"}, name)
            self.assertNotIn("privileged", effective, name)
            self.assertIs(pod["automountServiceAccountToken"], True, name)

    def test_cleanup_has_its_own_serviceaccount_and_pods(self):
        for name, values in render.example_values():
            objs = objects(values)
            deploy = named(objs, "Deployment", CLEANUP)
            (ds,) = by_kind(objs, "DaemonSet")
            sa = deploy["spec"]["template"]["spec"]["serviceAccountName"]
            self.assertEqual(sa, CLEANUP, name)
            self.assertNotEqual(sa, ds["spec"]["template"]["spec"]["serviceAccountName"], name)
            self.assertEqual(named(objs, "ServiceAccount", sa)["metadata"]["namespace"], render.NAMESPACE)
            # Neither workload's selector (nor the metrics NetworkPolicy's, the DaemonSet's)
            # matches the other's pods.
            cleanup_pod = deploy["spec"]["template"]["metadata"]["labels"]
            self.assertTrue(selects(deploy["spec"]["selector"], cleanup_pod))
            self.assertFalse(selects(ds["spec"]["selector"], cleanup_pod), name)
            self.assertFalse(selects(deploy["spec"]["selector"], ds["spec"]["template"]["metadata"]["labels"]), name)

    def test_schema_refuses_bad_cleanup_values(self):
        chart = helm.Chart.load(render.CHART)
        for bad in [{"cleanup": {"interval": "0"}}, {"cleanup": {"interval": "0s"}}, {"cleanup": {"interval": "1 minute"}},
                    {"cleanup": {"nodeGoneGrace": "5min"}}, {"cleanup": {"nodeGoneGrace": "-5m"}},
                    {"cleanup": {"leaseName": "Bad_Name"}}, {"cleanup": {"leaseName": ""}}, {"cleanup": {"replicas": 0}},
                    {"cleanup": {"enabled": "yes"}}, {"cleanup": {"intervall": "60s"}},
                    {"extraArgs": {"cleanup": "--x"}}]:
            with self.assertRaises(helm.HelmValuesError, msg=str(bad)):
                chart.validate_schema(chart.merge_values(bad))
        for good in [{"cleanup": {"interval": "500ms", "nodeGoneGrace": "0"}}, {"cleanup": {"interval": "90", "nodeGoneGrace": "1h"}},
                     {"cleanup": {"enabled": False}}]:
            chart.validate_schema(chart.merge_values(good))

    def test_extra_args_and_env_per_container(self):
        names = {"sealvol": "sealvol", "registrar": "node-driver-registrar", "provisioner": "csi-provisioner",
                 "resizer": "csi-resizer", "snapshotter": "csi-snapshotter", "livenessprobe": "liveness-probe"}
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
        self.assertEqual(containers["csi-snapshotter"]["env"][0]["name"], "NODE_NAME")
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

    def test_metrics_listen_on_the_pods_loopback_by_default(self):
        for name, values in render.example_values():
            (ds,) = by_kind(objects(values), "DaemonSet")
            pod = ds["spec"]["template"]["spec"]
            # 127.0.0.1 is the pod's own loopback only because the pod has its own network.
            self.assertIs(pod["hostNetwork"], False)
            driver = next(c for c in pod["containers"] if c["name"] == "sealvol")
            if values.get("metrics", {}).get("enabled", True):
                self.assertEqual(arg(driver["args"], "metrics-address"), ["127.0.0.1:9808"], name)
            else:
                self.assertEqual(arg(driver["args"], "metrics-address"), [], name)
            self.assertNotIn("metrics", [p["name"] for p in driver["ports"]], name)
            self.assertNotIn("annotations", ds["spec"]["template"]["metadata"], name)
            self.assertEqual(by_kind(objects(values), "NetworkPolicy"), [], name)

    def test_metrics_exposed_on_the_pod_ip_when_asked(self):
        objs = objects({"metrics": {"expose": True, "port": 9100}})
        (ds,) = by_kind(objs, "DaemonSet")
        driver = containers(objs)["sealvol"]
        self.assertEqual(arg(driver["args"], "metrics-address"), ["0.0.0.0:9100"])
        self.assertIn({"name": "metrics", "containerPort": 9100, "protocol": "TCP"}, driver["ports"])
        self.assertEqual(ds["spec"]["template"]["metadata"]["annotations"],
                         {"prometheus.io/scrape": "true", "prometheus.io/port": "9100", "prometheus.io/path": "/metrics"})
        self.assertEqual(by_kind(objs, "NetworkPolicy"), [])
        objs = objects({"metrics": {"expose": True, "networkPolicy": {"enabled": True}}})
        (policy,) = by_kind(objs, "NetworkPolicy")
        (ds,) = by_kind(objs, "DaemonSet")
        self.assertEqual(policy["spec"]["podSelector"]["matchLabels"], ds["spec"]["selector"]["matchLabels"])
        self.assertEqual(policy["spec"]["policyTypes"], ["Ingress"])
        (ingress,) = policy["spec"]["ingress"]
        self.assertEqual(ingress["ports"], [{"protocol": "TCP", "port": 9808}])
        selectors = [p["podSelector"]["matchExpressions"][0] for p in ingress["from"]]
        self.assertEqual({(s["key"], s["values"][0]) for s in selectors}, {("rsName", "ama-metrics"), ("dsName", "ama-metrics-node")})
        # A policy for loopback metrics would only cut kubelet's view of nothing: not rendered.
        self.assertEqual(by_kind(objects({"metrics": {"networkPolicy": {"enabled": True}}}), "NetworkPolicy"), [])
        chart = helm.Chart.load(render.CHART)
        for bad in [{"metrics": {"port": 9809}}, {"metrics": {"expose": "yes"}}, {"metrics": {"networkPolicy": {"from": []}}}]:
            with self.assertRaises(helm.HelmValuesError, msg=str(bad)):
                chart.validate_schema(chart.merge_values(bad))

    def test_registered_metrics_are_read_from_the_driver(self):
        with open(METRICS_RS) as fh:
            source = fh.read()
        names = registered_metrics(source)
        for expected in ["sealvol_csi_operations_total", "sealvol_csi_operation_duration_seconds_bucket",
                         "sealvol_azure_requests_total", "sealvol_key_events_total", "sealvol_volumes",
                         "sealvol_pool_free_bytes", "sealvol_pool_capacity_bytes"]:
            self.assertIn(expected, names)
        self.assertNotIn("sealvol_volumes_total", names, "a gauge has no _total")
        self.assertEqual(len(registered_families(source)), len(re.findall(r"registry\.register\(", source)),
                         "every registered metric was understood")
        # A renamed metric is caught: the check below would fail on this source.
        renamed = registered_metrics(source.replace('register("key_events"', 'register("key_event_count"'))
        self.assertNotIn("sealvol_key_events_total", renamed)
        self.assertIn("sealvol_key_event_count_total", renamed)

    def test_monitoring_is_off_by_default(self):
        for name, values in render.example_values():
            objs = objects(values)
            self.assertEqual(by_kind(objs, "PrometheusRule") + by_kind(objs, "ConfigMap"), [], name)

    def test_alerts_and_dashboard_use_only_metrics_the_driver_exports(self):
        with open(METRICS_RS) as fh:
            known = registered_metrics(fh.read())
        objs = objects({"monitoring": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
                                       "dashboard": {"enabled": True}}})
        rules = rule_exprs(objs)
        panels = dashboard_exprs(objs)
        for what, exprs in [("alert", rules), ("dashboard", {e: e for e in panels})]:
            for key, expr in exprs.items():
                used = metric_names(expr)
                self.assertLessEqual(used, known, f"{what} {key}: {sorted(used - known)} not registered in src/metrics.rs")
                self.assertTrue(used or expr.startswith("up{"), f"{what} {key} uses no sealvol metric")
        self.assertEqual(set(rules), {"SealvolVolumeAbnormal", "SealvolKeyReleaseDenied", "SealvolVolumeLocked", "SealvolAzureUnavailable", "SealvolAzureSlow",
                                      "SealvolPoolNearlyFull", "SealvolInternalError", "SealvolDriverDown", "SealvolMetricsAbsent"})
        self.assertEqual(rules["SealvolDriverDown"], 'up{job="sealvol"} == 0')
        self.assertEqual(rules["SealvolMetricsAbsent"], "absent(sealvol_volumes)")
        (rule,) = by_kind(objs, "PrometheusRule")
        self.assertEqual(rule["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(rule["metadata"]["labels"]["release"], "prom")
        for r in (r for g in rule["spec"]["groups"] for r in g["rules"]):
            self.assertIn(r["labels"]["severity"], {"warning", "critical"}, r["alert"])
            self.assertTrue(r["annotations"]["summary"] and r["annotations"]["description"], r["alert"])
        (cm,) = by_kind(objs, "ConfigMap")
        self.assertEqual(cm["metadata"]["labels"]["grafana_dashboard"], "1")
        self.assertEqual(cm["metadata"]["namespace"], render.NAMESPACE)
        # And the dashboard shows every family the driver registers.
        used = set().union(*(metric_names(e) for e in panels))
        with open(METRICS_RS) as fh:
            for family, samples in registered_families(fh.read()).items():
                self.assertTrue(samples & used, f"the dashboard shows nothing of {family}")
        objs = objects({"monitoring": {"prometheusRule": {"enabled": True, "upSelector": 'namespace="kube-system", pod=~"sealvol-.*"'}}})
        self.assertEqual(rule_exprs(objs)["SealvolDriverDown"], 'up{namespace="kube-system", pod=~"sealvol-.*"} == 0')

    def test_docs_name_only_metrics_the_driver_exports(self):
        with open(METRICS_RS) as fh:
            known = registered_metrics(fh.read())
        for path in ["README.md", "docs/operations.md", "docs/design.md"]:
            with open(os.path.join(render.ROOT, path)) as fh:
                unknown = metric_names(fh.read()) - known
            self.assertEqual(unknown, set(), f"{path} names metrics src/metrics.rs does not register")

    def test_render_refuses_to_leave_out_a_template(self):
        # deploy/ is rendered template by template in render.ORDER: a template missing there
        # would silently vanish from deploy/.
        saved = render.ORDER
        render.ORDER = [t for t in saved if t != "monitoring.yaml"]
        try:
            with self.assertRaisesRegex(ValueError, "monitoring.yaml"):
                render.render({})
        finally:
            render.ORDER = saved

    def test_snapshotter_runs_beside_the_driver_on_every_node(self):
        objs = objects({})
        (ds,) = by_kind(objs, "DaemonSet")
        pod = ds["spec"]["template"]["spec"]
        cs = containers(objs)
        snap = cs["csi-snapshotter"]
        # One per node, for this node's volumes: the distributed mode, which finds its node by
        # NODE_NAME from the downward API, as external-provisioner does.
        self.assertIn("--node-deployment", snap["args"])
        env = {e["name"]: e for e in snap["env"]}
        self.assertEqual(env["NODE_NAME"], {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
        self.assertEqual(env["NODE_NAME"], {e["name"]: e for e in cs["csi-provisioner"]["env"]}["NODE_NAME"])
        # The driver's own socket, in the same host directory as the other sidecars'.
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.assertEqual(arg(snap["args"], "csi-address"), ["/csi/csi.sock"])
        self.assertEqual(arg(cs["sealvol"]["args"], "endpoint"), ["unix:///csi/csi.sock"])
        mount = next(m for m in snap["volumeMounts"] if m["mountPath"] == "/csi")
        driver_mount = next(m for m in cs["sealvol"]["volumeMounts"] if m["mountPath"] == "/csi")
        self.assertEqual(mount["name"], driver_mount["name"])
        self.assertEqual(volumes[mount["name"]]["hostPath"]["path"], "/var/lib/kubelet/plugins/sealvol.csi.io")
        # The snapshot's names reach CreateSnapshot; a call waits longer than a 30 s freeze.
        self.assertIn("--extra-create-metadata", snap["args"])
        self.assertEqual(arg(snap["args"], "timeout"), ["2m"])
        self.assertEqual(arg(snap["args"], "v"), ["2"])
        # No group snapshots (the gate is on by default in v8.7.0), no leader election (refused
        # with --node-deployment; each node acts for itself, so no lease either).
        self.assertEqual(arg(snap["args"], "feature-gates"), ["CSIVolumeGroupSnapshot=false"])
        self.assertFalse([a for a in snap["args"] if a.startswith("--leader-election")])
        leases = [r for r in named(objs, "Role", NODE)["rules"] if "leases" in r["resources"]]
        self.assertEqual([n for r in leases for n in r.get("resourceNames", [])], ["external-resizer-sealvol-csi-io"])
        self.assertEqual(snap["resources"], {"requests": {"cpu": "5m", "memory": "32Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}})
        self.assertEqual(snap["image"], "registry.k8s.io/sig-storage/csi-snapshotter:v8.7.0")
        # The timeout is a value.
        snap = containers(objects({"snapshots": {"timeout": "5m"}}))["csi-snapshotter"]
        self.assertEqual(arg(snap["args"], "timeout"), ["5m"])

    def test_snapshots_can_be_turned_off(self):
        for name, values in render.example_values():
            on = objects({**values, "snapshots": {"enabled": True}, "snapshotClasses": []})
            off = objects({**values, "snapshots": {"enabled": False}, "snapshotClasses": []})
            self.assertIn("csi-snapshotter", containers(on), name)
            self.assertNotIn("csi-snapshotter", containers(off), name)
            # The container goes, and exactly the snapshot rules with it.
            on_rules = named(on, "ClusterRole", NODE)["rules"]
            off_rules = named(off, "ClusterRole", NODE)["rules"]
            self.assertEqual(off_rules, [r for r in on_rules if r not in SNAPSHOT_RULES], name)
            self.assertEqual([r for r in on_rules if r not in off_rules], SNAPSHOT_RULES, name)
            self.assertFalse([r for r in off_rules if "snapshot.storage.k8s.io" in r["apiGroups"]], name)
            # Nothing else changes.
            (ds_on,) = by_kind(on, "DaemonSet")
            (ds_off,) = by_kind(off, "DaemonSet")
            ds_on["spec"]["template"]["spec"]["containers"] = [
                c for c in ds_on["spec"]["template"]["spec"]["containers"] if c["name"] != "csi-snapshotter"]
            self.assertEqual(ds_off, ds_on, name)
            rest = lambda objs: [o for o in objs if o["kind"] != "DaemonSet" and not (o["kind"] == "ClusterRole" and o["metadata"]["name"] == NODE)]
            self.assertEqual(rest(off), rest(on), name)

    def test_snapshot_rules_are_exactly_what_the_sidecars_call(self):
        role = named(objects({}), "ClusterRole", NODE)
        snapshot_rules = [r for r in role["rules"] if any("snapshot" in g for g in r["apiGroups"])]
        self.assertEqual(snapshot_rules, SNAPSHOT_RULES)
        for r in snapshot_rules:
            self.assertNotIn("create", r["verbs"], r)
            self.assertNotIn("delete", r["verbs"], r)
            self.assertNotIn("resourceNames", r)
        # Nothing of group snapshots: the sidecar runs with their gate off.
        self.assertFalse([r for r in role["rules"] if "groupsnapshot.storage.k8s.io" in r["apiGroups"]])
        # The rule list above is what this test checks: changing a verb there fails it.
        widened = json.loads(json.dumps(SNAPSHOT_RULES))
        widened[1]["verbs"].append("delete")
        self.assertNotEqual(snapshot_rules, widened)

    def test_volume_snapshot_classes_from_values(self):
        for name, values in render.example_values():
            classes = by_kind(objects(values), "VolumeSnapshotClass")
            self.assertEqual(len(classes), len(values.get("snapshotClasses", [])), name)
            for vsc in classes:
                (csidriver,) = by_kind(objects(values), "CSIDriver")
                self.assertEqual(vsc["driver"], csidriver["metadata"]["name"], name)
        # None by default: the chart installs where the VolumeSnapshot CRDs are missing.
        self.assertEqual(by_kind(objects({}), "VolumeSnapshotClass"), [])
        objs = objects({"driverName": "local.sealvol.example",
                        "snapshotClasses": [{"name": "fast", "default": True}, {"name": "kept", "deletionPolicy": "Retain"}]})
        fast, kept = by_kind(objs, "VolumeSnapshotClass")
        self.assertEqual(fast["apiVersion"], "snapshot.storage.k8s.io/v1")
        self.assertEqual((fast["metadata"]["name"], fast["driver"], fast["deletionPolicy"]), ("fast", "local.sealvol.example", "Delete"))
        self.assertEqual(fast["metadata"]["annotations"], {"snapshot.storage.kubernetes.io/is-default-class": "true"})
        self.assertEqual((kept["driver"], kept["deletionPolicy"]), ("local.sealvol.example", "Retain"))
        self.assertNotIn("annotations", kept["metadata"])
        for vsc in (fast, kept):
            self.assertNotIn("parameters", vsc, "sealvol takes no snapshot parameters")
            self.assertEqual(vsc["metadata"]["labels"]["app.kubernetes.io/name"], "sealvol")
        (csidriver,) = by_kind(objs, "CSIDriver")
        self.assertEqual(fast["driver"], csidriver["metadata"]["name"])
        # A class without the snapshotter would take no snapshot.
        with self.assertRaisesRegex(helm.HelmRenderError, "snapshots.enabled"):
            objects({"snapshots": {"enabled": False}, "snapshotClasses": [{"name": "x"}]})

    def test_schema_refuses_bad_snapshot_values(self):
        chart = helm.Chart.load(render.CHART)
        for bad in [{"snapshots": {"enabled": "yes"}}, {"snapshots": {"timeout": "0"}}, {"snapshots": {"timeout": "0s"}},
                    {"snapshots": {"timeout": "120"}}, {"snapshots": {"timeout": "2 minutes"}}, {"snapshots": {"timout": "2m"}},
                    {"snapshots": {"leaderElection": True}},
                    {"snapshotClasses": [{"name": "x", "parameters": {"fsType": "ext4"}}]},
                    {"snapshotClasses": [{"name": "Bad_Name"}]}, {"snapshotClasses": [{"default": True}]},
                    {"snapshotClasses": [{"name": "x", "deletionPolicy": "delete"}]},
                    {"snapshotClasses": [{"name": "x", "driver": "other.csi.io"}]},
                    {"sidecars": {"snapshotter": {"image": "registry.k8s.io/sig-storage/csi-snapshotter"}}},
                    {"extraArgs": {"snapshotter": "--v=5"}}, {"extraEnv": {"snapshotter": [{"value": "no name"}]}}]:
            with self.assertRaises(helm.HelmValuesError, msg=str(bad)):
                chart.validate_schema(chart.merge_values(bad))
        for good in [{"snapshots": {"enabled": False}}, {"snapshots": {"timeout": "90s"}},
                     {"snapshotClasses": [{"name": "sealvol", "default": True, "deletionPolicy": "Retain", "parameters": {}}]},
                     {"extraArgs": {"snapshotter": ["--v=5"]}}]:
            chart.validate_schema(chart.merge_values(good))

    def test_backups_are_off_by_default(self):
        # No backup.urls: no backup flag, no projected token, no annotation on the ServiceAccount.
        for name, values in [(n, v) for n, v in render.example_values() if not v.get("backup", {}).get("urls")]:
            objs = objects(values)
            (ds,) = by_kind(objs, "DaemonSet")
            pod = ds["spec"]["template"]["spec"]
            driver = containers(objs)["sealvol"]
            self.assertFalse([a for a in driver["args"] if a.startswith("--backup-")], name)
            self.assertNotIn("azure-identity-token", [v["name"] for v in pod["volumes"]], name)
            self.assertFalse([v for v in pod["volumes"] if "projected" in v], name)
            for c in pod["containers"]:
                self.assertFalse([m for m in c["volumeMounts"] if m["mountPath"].startswith("/var/run/secrets/azure")], f"{name}/{c['name']}")
            self.assertNotIn("annotations", named(objs, "ServiceAccount", NODE)["metadata"], name)
        self.assertTrue(any(n == "default" for n, _ in render.example_values()))

    def test_backups_use_the_drivers_own_projected_token(self):
        client = "11111111-2222-3333-4444-555555555555"
        urls = ["https://acct.blob.core.windows.net/backups", "https://127.0.0.1:10000/devstoreaccount1/snaps/"]
        values = {"azure": {"tenantId": PLACEHOLDER_ID}, "backup": {"urls": urls, "clientId": client}}
        objs = objects(values)
        (ds,) = by_kind(objs, "DaemonSet")
        pod = ds["spec"]["template"]["spec"]
        driver = containers(objs)["sealvol"]
        args = driver["args"]
        # The flags, exactly, and the tenant of the identity.
        self.assertEqual([a for a in args if a.startswith("--backup-")], [
            "--backup-url=https://acct.blob.core.windows.net/backups,https://127.0.0.1:10000/devstoreaccount1/snaps/",
            f"--backup-client-id={client}",
            "--backup-token-file=/var/run/secrets/azure/tokens/azure-identity-token",
        ])
        self.assertEqual(arg(args, "tenant-id"), [PLACEHOLDER_ID])
        # The token file is the projected volume's path, mounted read-only where the flag says.
        mount = next(m for m in driver["volumeMounts"] if m["name"] == "azure-identity-token")
        self.assertEqual(mount, {"name": "azure-identity-token", "mountPath": "/var/run/secrets/azure/tokens", "readOnly": True})
        volume = next(v for v in pod["volumes"] if v["name"] == "azure-identity-token")
        self.assertEqual(volume, {"name": "azure-identity-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "api://AzureADTokenExchange", "expirationSeconds": 3600, "path": "azure-identity-token"}}]}})
        (token_file,) = arg(args, "backup-token-file")
        self.assertEqual(token_file, f"{mount['mountPath']}/{volume['projected']['sources'][0]['serviceAccountToken']['path']}")
        # Only the driver mounts it.
        for c in pod["containers"]:
            if c["name"] != "sealvol":
                self.assertNotIn("azure-identity-token", [m["name"] for m in c["volumeMounts"]], c["name"])
        # The token is the pod's ServiceAccount's, which names the identity; the cleanup
        # controller's ServiceAccount does not.
        sa = named(objs, "ServiceAccount", pod["serviceAccountName"])
        self.assertEqual(sa["metadata"]["annotations"], {"azure.workload.identity/client-id": client})
        self.assertNotIn("annotations", named(objs, "ServiceAccount", CLEANUP)["metadata"])
        # The webhook is not asked to inject its own volume at the same path.
        self.assertNotIn("azure.workload.identity/use", ds["spec"]["template"]["metadata"]["labels"])
        # Nothing else changes: no RBAC for the projection.
        without = objects({"azure": {"tenantId": PLACEHOLDER_ID}})
        rest = lambda objs: [o for o in objs if o["kind"] not in ("DaemonSet", "ServiceAccount")]
        self.assertEqual(rest(objs), rest(without))
        self.assertEqual(named(objs, "ServiceAccount", CLEANUP), named(without, "ServiceAccount", CLEANUP))
        # The token's lifetime is a value.
        (ds,) = by_kind(objects({**values, "backup": {**values["backup"], "tokenExpirationSeconds": 86400}}), "DaemonSet")
        volume = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "azure-identity-token")
        self.assertEqual(volume["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"], 86400)

    def test_backups_need_the_drivers_identity(self):
        url = "https://acct.blob.core.windows.net/backups"
        with self.assertRaisesRegex(helm.HelmRenderError, r"backup\.urls needs backup\.clientId"):
            objects({"azure": {"tenantId": PLACEHOLDER_ID}, "backup": {"urls": [url]}})
        with self.assertRaisesRegex(helm.HelmRenderError, r"backup\.urls needs azure\.tenantId"):
            objects({"backup": {"urls": [url], "clientId": PLACEHOLDER_ID}})

    def test_snapshot_class_backup_url_must_be_a_backup_container(self):
        url = "https://acct.blob.core.windows.net/backups"
        backup = {"azure": {"tenantId": PLACEHOLDER_ID}, "backup": {"urls": [url], "clientId": PLACEHOLDER_ID}}
        other = "https://acct.blob.core.windows.net/elsewhere"
        for values in [{**backup, "snapshotClasses": [{"name": "b", "parameters": {"backupURL": other}}]},
                       {"snapshotClasses": [{"name": "b", "parameters": {"backupURL": url}}]}]:
            with self.assertRaisesRegex(helm.HelmRenderError, r"snapshotClasses b: parameters\.backupURL \S+ is not one of backup\.urls"):
                objects(values)
        try:
            objects({**backup, "snapshotClasses": [{"name": "b", "parameters": {"backupURL": other}}]})
        except helm.HelmRenderError as e:
            self.assertIn(other, str(e))
            self.assertIn(url, str(e))
        # Compared without a trailing slash, as the driver does; rendered as written.
        for listed, named_url in [(url, url + "/"), (url + "/", url), (url, url)]:
            objs = objects({**backup, "backup": {**backup["backup"], "urls": [listed]},
                            "snapshotClasses": [{"name": "b", "parameters": {"backupURL": named_url}}, {"name": "local"}]})
            b, local = by_kind(objs, "VolumeSnapshotClass")
            self.assertEqual(b["parameters"], {"backupURL": named_url})
            self.assertNotIn("parameters", local)
        # An empty parameters map is still no parameter.
        (vsc,) = by_kind(objects({"snapshotClasses": [{"name": "x", "parameters": {}}]}), "VolumeSnapshotClass")
        self.assertNotIn("parameters", vsc)

    def test_schema_refuses_bad_backup_values(self):
        chart = helm.Chart.load(render.CHART)
        good_url = "https://acct.blob.core.windows.net/backups"
        for bad in [{"backup": {"urls": ["https://acct.blob.core.windows.net/backups?sv=2024&sig=x"]}},
                    {"backup": {"urls": ["http://acct.blob.core.windows.net/backups"]}},
                    {"backup": {"urls": ["https://acct.blob.core.windows.net/backups#x"]}},
                    {"backup": {"urls": ["https://user@acct.blob.core.windows.net/backups"]}},
                    {"backup": {"urls": ["https://acct.blob.core.windows.net/backups,https://b.blob.core.windows.net/c"]}},
                    {"backup": {"urls": ["https://acct.blob.core.windows.net/Backups"]}},
                    {"backup": {"urls": ["https://acct.blob.core.windows.net/ab"]}},
                    {"backup": {"urls": ["https://acct.blob.core.windows.net/-backups"]}},
                    {"backup": {"urls": ["https://acct.blob.core.windows.net/"]}},
                    {"backup": {"urls": ["https://acct.blob.core.windows.net/backups/sub/dir"]}},
                    {"backup": {"urls": good_url}},
                    {"backup": {"clientId": "not-a-guid"}}, {"backup": {"clientId": "11111111222233334444555555555555"}},
                    {"backup": {"tokenExpirationSeconds": 599}}, {"backup": {"tokenExpirationSeconds": "3600"}},
                    {"backup": {"url": [good_url]}},
                    {"snapshotClasses": [{"name": "x", "parameters": {"backupURL": good_url, "fsType": "ext4"}}]},
                    {"snapshotClasses": [{"name": "x", "parameters": {"backupUrl": good_url}}]},
                    {"snapshotClasses": [{"name": "x", "parameters": {"backupURL": "http://acct.blob.core.windows.net/backups"}}]},
                    {"snapshotClasses": [{"name": "x", "parameters": {"backupURL": 5}}]}]:
            with self.assertRaises(helm.HelmValuesError, msg=str(bad)):
                chart.validate_schema(chart.merge_values(bad))
        for good in [{"backup": {"urls": [good_url, good_url + "/", "https://127.0.0.1:10000/devstoreaccount1/backups"],
                                 "clientId": "11111111-2222-3333-4444-55555555AAAA", "tokenExpirationSeconds": 600}},
                     {"backup": {"urls": [], "clientId": ""}},
                     {"snapshotClasses": [{"name": "x", "parameters": {"backupURL": good_url}}]}]:
            chart.validate_schema(chart.merge_values(good))

    def test_backup_example(self):
        (values,) = [v for n, v in render.example_values() if n == "backups"]
        objs = objects(values)
        urls = values["backup"]["urls"]
        self.assertTrue(urls)
        driver = containers(objs)["sealvol"]
        self.assertEqual(arg(driver["args"], "backup-url"), [",".join(urls)])
        self.assertEqual(arg(driver["args"], "backup-client-id"), [values["backup"]["clientId"]])
        classes = {c["metadata"]["name"]: c for c in by_kind(objs, "VolumeSnapshotClass")}
        backed = [c for c in classes.values() if "parameters" in c]
        self.assertEqual(len(backed), 1)
        self.assertEqual(len(classes), 2, "a local class and a backup class")
        self.assertIn(backed[0]["parameters"]["backupURL"], urls)
        self.assertEqual(set(backed[0]["parameters"]), {"backupURL"})
        # And in deploy/, where the VolumeSnapshotClasses go apart.
        apart = render.outputs()[f"{render.SNAPSHOT_DIR}/backups.yaml"]
        self.assertIn(backed[0], [d for d in yaml.safe_load_all(apart) if d])
        # The federated credential's subject its comment names is the ServiceAccount the pod runs as.
        (ds,) = by_kind(objs, "DaemonSet")
        subject = f"system:serviceaccount:{render.NAMESPACE}:{ds['spec']['template']['spec']['serviceAccountName']}"
        with open(os.path.join(render.CHART, "examples", "backups.yaml")) as fh:
            self.assertIn(subject, fh.read())

    def test_backup_identity_is_documented(self):
        with open(os.path.join(render.CHART, "values.yaml")) as fh:
            text = " ".join(re.sub(r"\n\s*#", " ", fh.read()).split())  # comments, joined across lines
        for phrase in ['"Backups to Azure Blob storage"', "system:serviceaccount:<release namespace>:<chart fullname>",
                       "OIDC issuer", "api://AzureADTokenExchange", '"Storage Blob Data Contributor"', "NO Key Vault role",
                       "backupURL"]:
            self.assertIn(phrase, text)

    def test_snapshot_requirements_are_documented(self):
        with open(os.path.join(render.CHART, "values.yaml")) as fh:
            values = fh.read()
        with open(os.path.join(render.ROOT, "docs", "operations.md")) as fh:
            ops = fh.read()
        for path, text in [("values.yaml", values), ("docs/operations.md", ops)]:
            for phrase in ["--enable-distributed-snapshotting", "https://github.com/kubernetes-csi/external-snapshotter",
                           "enabled: false"]:
                self.assertTrue(phrase in text, f"{path} does not say {phrase!r}")
        for phrase in ["## Snapshots, restores and clones", "--snapshot-freeze-limit", "snapshots.enabled: false",
                       "WaitForFirstConsumer", "kubernetes.io/hostname", "INVALID_ARGUMENT", "Azure Blob"]:
            self.assertTrue(phrase in ops, f"docs/operations.md does not say {phrase!r}")

    def test_deploy_keeps_snapshot_kinds_apart(self):
        # tests/manifests.rs refuses a kind it has no k8s-openapi type for, and k8s-openapi has no
        # snapshot types: deploy/sealvol.yaml and deploy/rendered/ hold only kinds it knows, the
        # VolumeSnapshotClasses go to deploy/snapshot-classes/, checked here field by field.
        known = manifests_rs_kinds()
        self.assertIn(("apps/v1", "DaemonSet"), known)
        outputs = render.outputs()
        apart = [p for p in outputs if p.startswith(render.SNAPSHOT_DIR + "/")]
        self.assertTrue(apart, "an example lists a VolumeSnapshotClass, so deploy/snapshot-classes/ is exercised")
        for path, text in outputs.items():
            docs = [d for d in yaml.safe_load_all(text) if d]
            if path in apart:
                for d in docs:
                    self.assertEqual((d["apiVersion"], d["kind"]), ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"), path)
                    # The fields of the v1 CRD's schema, and no other.
                    self.assertLessEqual(set(d), {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"}, path)
                    self.assertLessEqual(set(d["metadata"]), {"name", "labels", "annotations"}, path)
                    self.assertIn(d["deletionPolicy"], {"Delete", "Retain"}, path)
                    self.assertIsInstance(d["driver"], str, path)
            else:
                for d in docs:
                    self.assertIn((d["apiVersion"], d["kind"]), known, f"{path}: tests/manifests.rs would refuse it")
        for path in glob.glob(os.path.join(render.ROOT, "deploy", "examples", "*.yaml")):
            with open(path) as fh:
                for d in (d for d in yaml.safe_load_all(fh) if d):
                    self.assertIn((d["apiVersion"], d["kind"]), known, path)
        # Nothing of a snapshot kind is lost on the way: the full render holds it.
        (name, values) = next((n, v) for n, v in render.example_values() if v.get("snapshotClasses"))
        self.assertEqual(len(by_kind(objects(values), "VolumeSnapshotClass")), len(values["snapshotClasses"]))
        self.assertEqual(len([d for d in yaml.safe_load_all(outputs[f"{render.SNAPSHOT_DIR}/{name}.yaml"]) if d]),
                         len(values["snapshotClasses"]))

    def test_deploy_is_up_to_date_with_the_chart(self):
        for path, text in render.outputs().items():
            with open(os.path.join(render.ROOT, path)) as fh:
                self.assertEqual(fh.read(), text, f"{path} is out of date: run python3 hack/chart/render.py")


if __name__ == "__main__":
    unittest.main(verbosity=2)
