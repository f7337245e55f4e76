"""Renders charts/sealvol with Helm's own engine (helm-python-sdk: Helm v4 as a library, no
helm binary) into the manifests under deploy/: deploy/sealvol.yaml with the default values,
and deploy/rendered/<name>.yaml for each file in charts/sealvol/examples/. Objects whose kind
comes from CRDs a cluster may lack (the VolumeSnapshotClasses a values file lists) go to
deploy/snapshot-classes/<name>.yaml instead, so that the files above apply on any cluster.

    python3 hack/chart/render.py          # rewrite deploy/
    python3 hack/chart/render.py --check  # exit 1 if deploy/ is out of date
"""

import os
import sys

import helm_python as helm
import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "charts", "sealvol")
EXAMPLES = os.path.join(CHART, "examples")
RELEASE, NAMESPACE = "sealvol", "kube-system"
# Kinds from external-snapshotter's CRDs, which the cluster provides or not: rendered apart.
SNAPSHOT_KINDS = {"VolumeSnapshotClass"}
SNAPSHOT_DIR = "deploy/snapshot-classes"
HEADER = "# Rendered from charts/sealvol by hack/chart/render.py; do not edit by hand.\n"
ORDER = ["serviceaccount.yaml", "rbac.yaml", "admissionpolicy.yaml", "csidriver.yaml", "storageclass.yaml",
         "snapshotclass.yaml", "daemonset.yaml", "cleanup.yaml", "networkpolicy.yaml", "monitoring.yaml"]


def example_values():
    """(name, values) for the defaults and every example values file."""
    out = [("default", {})]
    for f in sorted(os.listdir(EXAMPLES)):
        if f.endswith(".yaml"):
            with open(os.path.join(EXAMPLES, f)) as fh:
                out.append((f[: -len(".yaml")], yaml.safe_load(fh) or {}))
    return out


def documents(values):
    """The chart's objects for `values`, in ORDER, each as its YAML text with a Source line."""
    chart = helm.Chart.load(CHART)
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    unknown = sorted(k for k in rendered if k.removeprefix("sealvol/templates/") not in ORDER)
    if unknown:
        raise ValueError(f"templates not in render.ORDER (they would be left out of deploy/): {unknown}")
    docs = []
    for name in ORDER:
        text = rendered.get(f"sealvol/templates/{name}", "")
        for doc in text.split("\n---"):
            doc = doc.strip().lstrip("-").strip()
            if doc:
                docs.append(f"# Source: charts/sealvol/templates/{name}\n{doc}\n")
    return docs


def render(values):
    """The chart's manifests for `values`, as one multi-document YAML text."""
    return HEADER + "---\n".join(documents(values))


def kind(doc):
    return yaml.safe_load(doc)["kind"]


def outputs():
    """deploy/ path -> the text it must hold."""
    out = {}
    for name, values in example_values():
        path = "deploy/sealvol.yaml" if name == "default" else f"deploy/rendered/{name}.yaml"
        docs = documents(values)
        apart = [d for d in docs if kind(d) in SNAPSHOT_KINDS]
        header = HEADER
        if apart:
            extra = f"{SNAPSHOT_DIR}/{name}.yaml"
            header += f"# Its VolumeSnapshotClasses are in {extra} (they need the VolumeSnapshot CRDs).\n"
            out[extra] = (HEADER + f"# The VolumeSnapshotClasses of {path}'s values, apart: their kind comes from the\n"
                          "# VolumeSnapshot CRDs (https://github.com/kubernetes-csi/external-snapshotter).\n"
                          + "---\n".join(apart))
        out[path] = header + "---\n".join(d for d in docs if d not in apart)
    return out


def main():
    check = "--check" in sys.argv
    stale = []
    for path, text in outputs().items():
        full = os.path.join(ROOT, path)
        current = open(full).read() if os.path.exists(full) else None
        if current != text:
            stale.append(path)
            if not check:
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "w") as fh:
                    fh.write(text)
    if check and stale:
        print("out of date with the chart (run python3 hack/chart/render.py):", ", ".join(stale))
        sys.exit(1)


if __name__ == "__main__":
    main()
