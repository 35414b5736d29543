"""ops/: every manifest parses and carries the fields its tool requires, and they agree with each other.

No docker, kubectl, cloud or network: the Ray cluster config is checked with Ray's own schema and
config preparation (what `ray up` runs before it calls AWS), Kubernetes manifests field by field
(required fields, references between objects, no literal secrets), the Dockerfiles with a small
instruction parser, the systemd units with configparser, crontab schedules with a cron parser, and
every `python -m scmm_atlas.jobs.X ...` command with the project's own argument parser.
"""

from __future__ import annotations

import argparse
import configparser
import copy
import fnmatch
import functools
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
README = ROOT / "README.md"
JOBS = "python -m scmm_atlas.jobs."  # the Ray Job entry points (scmm_atlas/jobs/)
SECTION = "## Running on a cluster"
NAMESPACE = "scmm-atlas"
SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|KEY", re.IGNORECASE)
WHOLE_SUBST = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# kind -> apiVersion, for every kind ops/ may use (a new kind has to be added here, deliberately).
API_VERSIONS = {
    "Namespace": "v1", "ServiceAccount": "v1", "ConfigMap": "v1", "Service": "v1", "Secret": "v1",
    "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
    "CronJob": "batch/v1", "Job": "batch/v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1",
    "NetworkPolicy": "networking.k8s.io/v1", "RayJob": "ray.io/v1", "RayCluster": "ray.io/v1",
}
CLUSTER_SCOPED = {"Namespace"}


# ----------------------------------------------------------------------------------------------
# Loading


def _ops_files() -> list[Path]:
    return sorted(p for p in OPS.rglob("*") if p.is_file() and "gpu-bench" not in p.relative_to(OPS).parts)


def _yaml_files() -> list[Path]:
    return [p for p in _ops_files() if p.suffix in (".yaml", ".yml")]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _is_compose(path: Path) -> bool:
    return path.name in ("docker-compose.yaml", "docker-compose.yml", "compose.yaml", "compose.yml")


def _is_ray_cluster(path: Path) -> bool:
    return path.parent.name == "ray"


def _k8s_files() -> list[Path]:
    return [p for p in _yaml_files() if not _is_compose(p) and not _is_ray_cluster(p)]


@functools.cache
def _k8s_docs() -> list[tuple[str, dict]]:
    """Every Kubernetes object in ops/, plus manifests held in ConfigMaps (e.g. the scheduled RayJob).

    Cached: callers must not modify what they get."""
    out = []
    for path in _k8s_files():
        for i, doc in enumerate(_docs(path)):
            where = f"{path.relative_to(ROOT)}[{i}]"
            out.append((where, doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        out += [(f"{where}.data[{key}]", d) for d in yaml.safe_load_all(text) if d is not None]
    return out


def _by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(w, d) for w, d in _k8s_docs() if d.get("kind") == kind]


def _named(kind: str, name: str, namespace: str | None = NAMESPACE) -> dict | None:
    for _, d in _by_kind(kind):
        if d["metadata"]["name"] == name and d["metadata"].get("namespace") == namespace:
            return d
    return None


def _ns(doc: dict) -> str | None:
    return doc.get("metadata", {}).get("namespace")


def _pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        yield kind, spec["template"]["spec"]
    elif kind == "CronJob":
        yield kind, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("RayJob", "RayCluster"):
        cluster = spec.get("rayClusterSpec", spec) if kind == "RayJob" else spec
        yield "ray-head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs") or []:
            yield "ray-worker", group["template"]["spec"]
        if kind == "RayJob" and spec.get("submitterPodTemplate"):
            yield "Job", spec["submitterPodTemplate"]["spec"]
    elif kind == "Pod":
        yield kind, spec


def _qty(value: Any) -> float:
    """A Kubernetes quantity ("500m", "4", "16Gi") as a number."""
    s = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * units[suffix]
    return float(s)


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with `\\` continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue  # comments (also inside a continuation, as Docker does) and blank lines
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def _env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (comments and blanks skipped), as systemd's EnvironmentFile and sh read them."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}: bad line {line!r}"
            out[key] = value
    return out


def _expand(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in env, f"${name} is not defined in the environment file"
        return env[name]

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)\}|\$([A-Z_][A-Z0-9_]*)", sub, text)


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string(path.read_text())
    return parser


def _crontab() -> list[tuple[str, str]]:
    """(schedule, command) of each job line; environment lines must be NAME=value."""
    jobs = []
    for line in (OPS / "cron" / "crontab").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"^[A-Z_][A-Z0-9_]*=", line):
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, f"crontab: {line!r}"
        jobs.append((" ".join(fields[:5]), fields[5]))
    return jobs


def _readme_section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


# ----------------------------------------------------------------------------------------------
# Cron


_MONTHS = {m: i + 1 for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                                            "nov", "dec"))}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_CRON_FIELDS = [(0, 59, {}), (0, 23, {}), (1, 31, {}), (1, 12, _MONTHS), (0, 7, _DAYS)]


def _cron_ok(expr: str) -> bool:
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in field.split(","):
            rng, slash, step = part.partition("/")
            if slash and not (step.isdigit() and int(step) >= 1):
                return False
            if rng == "*":
                continue
            bounds = []
            for v in rng.split("-"):
                v = str(names.get(v.lower(), v))
                if not v.isdigit() or not lo <= int(v) <= hi:
                    return False
                bounds.append(int(v))
            if len(bounds) > 2 or (len(bounds) == 2 and bounds[0] > bounds[1]):
                return False
    return True


def test_cron_parser_rejects_bad_schedules():
    assert _cron_ok("30 2 * * *") and _cron_ok("*/15 0-6 1,15 jan-mar mon-fri")
    for bad in ("30 2 * *", "60 2 * * *", "30 24 * * *", "30 2 0 * *", "* * * 13 *", "*/0 * * * *", "5-1 * * * *",
                "30 2 * * * *", "@daily"):
        assert not _cron_ok(bad), bad


# ----------------------------------------------------------------------------------------------
# Every YAML file


def test_ops_has_the_expected_files():
    names = {str(p.relative_to(OPS)) for p in _ops_files()}
    for required in ("docker/Dockerfile", "ray/cluster-gpu.yaml", "kuberay/rayjob-train.yaml",
                     "kuberay/cronjob-reprocess.yaml", "cron/scmm-reprocess.service", "cron/scmm-reprocess.timer",
                     "cron/crontab", "mlflow/docker-compose.yaml", "mlflow/k8s.yaml"):
        assert required in names, required


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(OPS)))
def test_yaml_parses(path: Path):
    docs = _docs(path)
    assert docs, f"{path} has no documents"
    assert all(isinstance(d, dict) for d in docs)


# ----------------------------------------------------------------------------------------------
# Kubernetes: every object


def test_k8s_objects_have_required_fields():
    docs = _k8s_docs()
    assert len(docs) >= 10
    seen = set()
    for where, d in docs:
        kind = d.get("kind")
        assert kind in API_VERSIONS, f"{where}: unknown kind {kind!r}"
        assert d.get("apiVersion") == API_VERSIONS[kind], f"{where}: apiVersion {d.get('apiVersion')!r}"
        name = d.get("metadata", {}).get("name")
        assert isinstance(name, str) and len(name) <= 253 and DNS_SUBDOMAIN.match(name), f"{where}: metadata.name"
        if kind in CLUSTER_SCOPED:
            assert _ns(d) is None, where
        else:
            assert _ns(d) == NAMESPACE, f"{where}: namespace {_ns(d)!r}"
        key = (kind, _ns(d), name)
        assert key not in seen, f"{where}: {key} defined twice"
        seen.add(key)
        for k, v in (d["metadata"].get("labels") or {}).items():
            assert isinstance(v, str) and len(v) <= 63, f"{where}: label {k}"
    assert ("Namespace", None, NAMESPACE) in seen


def test_no_secret_objects_and_no_literal_secrets_in_env():
    for where, d in _k8s_docs():
        assert d["kind"] != "Secret", f"{where}: Secrets are created out of band, never committed"
        for _, pod in _pod_specs(d):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                for e in c.get("env") or []:
                    assert ("value" in e) != ("valueFrom" in e), f"{where}: env {e.get('name')}"
                    if SECRETISH.search(e["name"]):
                        assert "valueFrom" in e, f"{where}: {e['name']} must come from a Secret (valueFrom)"
                        assert "secretKeyRef" in e["valueFrom"], f"{where}: {e['name']}"


def test_referenced_secrets_are_documented():
    """Each Secret a manifest reads is created by a command written out in ops/ (it is never committed)."""
    refs = set()
    for where, d in _k8s_docs():
        for _, pod in _pod_specs(d):
            for c in pod["containers"]:
                refs |= {(where, e["valueFrom"]["secretKeyRef"]["name"]) for e in c.get("env") or []
                         if "secretKeyRef" in e.get("valueFrom", {})}
                refs |= {(where, s["secretRef"]["name"]) for s in c.get("envFrom") or [] if "secretRef" in s}
    assert refs
    text = "\n".join(p.read_text() for p in _ops_files())
    for where, name in refs:
        assert re.search(rf"create secret generic {re.escape(name)}\b", text), f"{where}: how is {name} created?"


def test_pod_specs():
    checked = 0
    for where, d in _k8s_docs():
        for role, pod in _pod_specs(d):
            checked += 1
            containers = pod.get("containers")
            assert containers and isinstance(containers, list), f"{where}: no containers"
            names = [c.get("name") for c in containers]
            assert len(set(names)) == len(names) and all(n and DNS_LABEL.match(n) for n in names), where
            volumes = {v["name"]: v for v in pod.get("volumes") or []}
            claims = {t["metadata"]["name"] for t in (d.get("spec", {}).get("volumeClaimTemplates") or [])}
            for v in volumes.values():
                if "configMap" in v:
                    assert _named("ConfigMap", v["configMap"]["name"], _ns(d)), f"{where}: volume {v['name']}"
            if role in ("Job", "CronJob"):
                assert pod.get("restartPolicy") in ("OnFailure", "Never"), f"{where}: restartPolicy"
            elif role in ("Deployment", "StatefulSet"):
                assert pod.get("restartPolicy", "Always") == "Always", where
            if "serviceAccountName" in pod:
                assert _named("ServiceAccount", pod["serviceAccountName"], _ns(d)), f"{where}: service account"
            for c in containers:
                image = c.get("image")
                assert isinstance(image, str) and image and not re.search(r"\s", image), f"{where}: image"
                tag = image.rsplit("/", 1)[-1]
                assert ":" in tag and not tag.endswith(":latest"), f"{where}: pin the image tag ({image})"
                for p in c.get("ports") or []:
                    assert 1 <= p["containerPort"] <= 65535, where
                    assert "name" not in p or (len(p["name"]) <= 15 and DNS_LABEL.match(p["name"])), where
                for m in c.get("volumeMounts") or []:
                    assert m["name"] in volumes or m["name"] in claims, f"{where}: mount {m['name']}"
                    assert m["mountPath"].startswith("/"), where
                for s in c.get("envFrom") or []:
                    if "configMapRef" in s and not s["configMapRef"].get("optional"):
                        assert _named("ConfigMap", s["configMapRef"]["name"], _ns(d)), f"{where}: envFrom"
                res = c.get("resources") or {}
                req, lim = res.get("requests") or {}, res.get("limits") or {}
                for k in set(req) & set(lim):
                    assert _qty(req[k]) <= _qty(lim[k]), f"{where}: {c['name']} requests {k} > limits"
                if "nvidia.com/gpu" in req or "nvidia.com/gpu" in lim:
                    # Extended resources: limits required; requests, if given, equal to limits.
                    assert "nvidia.com/gpu" in lim and req.get("nvidia.com/gpu", lim["nvidia.com/gpu"]) == \
                        lim["nvidia.com/gpu"], f"{where}: GPU requests/limits"
    assert checked >= 6


def test_workloads_services_and_selectors():
    workloads = [(w, d) for w, d in _k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")]
    services = _by_kind("Service")
    assert workloads and services
    for where, d in workloads:
        labels = d["spec"]["template"]["metadata"]["labels"]
        match = d["spec"]["selector"]["matchLabels"]
        assert match and match.items() <= labels.items(), f"{where}: selector does not match the template"
        if d["kind"] == "StatefulSet":
            assert _named("Service", d["spec"]["serviceName"]), f"{where}: serviceName"
    for where, svc in services:
        sel = svc["spec"]["selector"]
        targets = [d for _, d in workloads if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"{where}: the selector matches no workload"
        port_names = {p.get("name") for t in targets for c in t["spec"]["template"]["spec"]["containers"]
                      for p in c.get("ports") or []}
        assert svc["spec"]["ports"]
        for p in svc["spec"]["ports"]:
            assert 1 <= p["port"] <= 65535
            if isinstance(p.get("targetPort"), str):
                assert p["targetPort"] in port_names, f"{where}: targetPort {p['targetPort']}"
        # Nothing is published outside the cluster: the job server, MLflow and the database stay internal.
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{where}: not ClusterIP"


def test_network_policy():
    policies = _by_kind("NetworkPolicy")
    assert policies
    for where, p in policies:
        assert isinstance(p["spec"]["podSelector"], dict), where
        assert set(p["spec"]["policyTypes"]) <= {"Ingress", "Egress"}, where
        for rule in p["spec"].get("ingress") or []:
            assert rule.get("from"), f"{where}: an ingress rule without `from` admits everyone"


def test_internal_urls_name_services():
    """http://NAME:PORT in the Kubernetes manifests is a Service of that name and port in the namespace."""
    found = 0
    for path in _k8s_files():
        for name, port in re.findall(r"https?://([a-z0-9-]+):(\d+)", path.read_text()):
            if name in ("localhost",):
                continue
            svc = _named("Service", name)
            assert svc, f"{path.name}: no Service {name}"
            assert int(port) in {p["port"] for p in svc["spec"]["ports"]}, f"{path.name}: {name}:{port}"
            found += 1
    assert found >= 3


def test_rbac_references():
    bindings = _by_kind("RoleBinding")
    assert bindings
    for where, rb in bindings:
        ref = rb["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io" and ref["kind"] == "Role", where
        assert _named("Role", ref["name"], _ns(rb)), f"{where}: no Role {ref['name']}"
        assert rb["subjects"], where
        for s in rb["subjects"]:
            assert s["kind"] == "ServiceAccount" and s["namespace"] == _ns(rb), where
            assert _named("ServiceAccount", s["name"], s["namespace"]), f"{where}: no ServiceAccount {s['name']}"
    for where, role in _by_kind("Role"):
        assert role["rules"], where
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert rule[field] and "*" not in rule[field], f"{where}: {field} must be explicit"


def _granted(namespace: str, sa: str) -> set[tuple[str, str, str]]:
    out = set()
    for _, rb in _by_kind("RoleBinding"):
        if _ns(rb) == namespace and any(s["name"] == sa for s in rb["subjects"]):
            role = _named("Role", rb["roleRef"]["name"], namespace)
            out |= {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                    for v in rule["verbs"]}
    return out


# ----------------------------------------------------------------------------------------------
# RayJob and the CronJob that submits one


def _rayjobs() -> list[tuple[str, dict]]:
    return _by_kind("RayJob")


def test_rayjobs():
    import ray
    from packaging.specifiers import SpecifierSet

    jobs = _rayjobs()
    assert len(jobs) >= 2  # training, and the scheduled reprocessing (inside the CronJob's ConfigMap)
    ray_spec = next(d for d in _pyproject()["dependencies"] if d.startswith("ray"))
    for where, job in jobs:
        spec = job["spec"]
        assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip(), f"{where}: entrypoint"
        assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode",
                                                            "SidecarMode"), where
        assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: the GPU cluster must go away"
        assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0, where
        cluster = spec["rayClusterSpec"]
        version = cluster["rayVersion"]
        assert version in SpecifierSet(ray_spec.split("]", 1)[1]), f"{where}: rayVersion {version} vs {ray_spec}"
        assert version.split(".")[:2] == ray.__version__.split(".")[:2], f"{where}: rayVersion {version}, " \
            f"installed ray {ray.__version__}"
        head = cluster["headGroupSpec"]
        assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams strings"
        assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") in ("0.0.0.0", "127.0.0.1", "localhost")
        head_containers = head["template"]["spec"]["containers"]
        assert head_containers and all(c.get("image") for c in head_containers), where
        assert not any("nvidia.com/gpu" in (c.get("resources") or {}).get("limits", {}) for c in head_containers), \
            f"{where}: the head needs no GPU"
        groups = cluster["workerGroupSpecs"]
        assert groups, where
        autoscaling = cluster.get("enableInTreeAutoscaling", False)
        capacity = 0
        for g in groups:
            assert isinstance(g.get("groupName"), str) and DNS_LABEL.match(g["groupName"]), where
            for k in ("replicas", "minReplicas", "maxReplicas"):
                assert isinstance(g.get(k), int) and g[k] >= 0, f"{where}: {g.get('groupName')}.{k}"
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: replicas out of range"
            assert all(isinstance(v, str) for v in (g.get("rayStartParams") or {}).values()), where
            gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                    for c in g["template"]["spec"]["containers"]]
            assert max(gpus) >= 1, f"{where}: worker group {g['groupName']} has no GPU limit"
            capacity += sum(gpus) * (g["maxReplicas"] if autoscaling else g["replicas"])
        args = _entrypoint_args(spec["entrypoint"])
        if args is not None and getattr(args, "gpu", False) and args.num_workers:
            assert capacity >= args.num_workers, f"{where}: {args.num_workers} GPU workers, {capacity} GPUs"


def test_rayjob_images_match_the_project_image():
    """All scmm-atlas containers run one image tag, the one `ray up` uses too."""
    ray_image = yaml.safe_load((OPS / "ray" / "cluster-gpu.yaml").read_text())["docker"]["image"]
    images = {c["image"] for _, job in _rayjobs() for _, pod in _pod_specs(job) for c in pod["containers"]}
    assert images == {ray_image}


def test_cronjob_submits_the_rayjob():
    crons = _by_kind("CronJob")
    assert crons
    for where, cron in crons:
        spec = cron["spec"]
        assert _cron_ok(spec["schedule"]), f"{where}: schedule {spec['schedule']!r}"
        assert spec.get("concurrencyPolicy", "Allow") in ("Allow", "Forbid", "Replace"), where
        assert spec.get("concurrencyPolicy") == "Forbid", f"{where}: two reprocessings must not overlap"
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] in ("OnFailure", "Never"), where
        (c,) = pod["containers"]
        assert c["image"] and (c.get("command") or c.get("args")), f"{where}: image and command/args"
        script = "\n".join(c.get("command", []) + c.get("args", []))
        # The manifest it creates is a mounted ConfigMap key holding a RayJob.
        (path,) = re.findall(r"kubectl create -f (\S+)", script)
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        cm = _named("ConfigMap", volume["configMap"]["name"], _ns(cron))
        key = path[len(mount["mountPath"].rstrip("/")) + 1:]
        (job,) = list(yaml.safe_load_all(cm["data"][key]))
        assert job["kind"] == "RayJob" and _ns(job) == _ns(cron)
        # The name it deletes and polls is the RayJob it creates.
        polled = set(re.findall(r"kubectl (?:get|delete) rayjob (\S+)", script))
        assert polled == {job["metadata"]["name"]}, polled
        assert "python -m scmm_atlas.jobs.reprocess" in job["spec"]["entrypoint"]
        # Its service account may do exactly what the script does, on RayJobs.
        verbs = set(re.findall(r"kubectl (create|get|delete|apply|patch)\b", script))
        grants = _granted(_ns(cron), pod["serviceAccountName"])
        for verb in verbs:
            assert ("ray.io", "rayjobs", verb) in grants, f"{where}: may not {verb} rayjobs"
        assert {r for _, r, _ in grants} == {"rayjobs"}
        # The RayJob must be able to end before the Job that waits for it is killed.
        assert job["spec"]["activeDeadlineSeconds"] < spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]


# ----------------------------------------------------------------------------------------------
# Entry points: python -m scmm_atlas.jobs.X, checked against the project's own CLI


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _image_root() -> str:
    workdirs = [a for i, a in _dockerfile(OPS / "docker" / "Dockerfile") if i == "WORKDIR"]
    return workdirs[-1].rstrip("/") + "/"


def _split_command(cmd: str) -> list[str]:
    """The `python -m scmm_atlas.jobs.X ARGS` part of a shell command line, as argv (module first)."""
    tokens = shlex.split(cmd.split("python -m ", 1)[1])
    out = []
    for t in tokens:
        if t in ("&&", "||", ";", "|") or t.startswith((">", "2>")):
            break
        out.append(t)
    return out


def _entrypoint_args(cmd: str) -> argparse.Namespace | None:
    """Parse `python -m scmm_atlas.jobs.X ARGS` with the subcommand X of `scmm-atlas` (what jobs/X.py calls)."""
    if JOBS not in cmd:
        return None
    from scmm_atlas.cli import build_parser

    argv = _split_command(cmd)
    module = argv[0].removeprefix("scmm_atlas.jobs.")
    try:
        return build_parser().parse_args([module, *argv[1:]])
    except SystemExit:
        pytest.fail(f"`scmm-atlas {module}` rejects {argv[1:]}")


def _commands() -> list[tuple[str, str]]:
    """Every concrete `python -m scmm_atlas.jobs...` command line in ops/ and in the README section."""
    out = [(w, j["spec"]["entrypoint"]) for w, j in _rayjobs()]
    env = _env_file(OPS / "cron" / "reprocess.env.example")
    unit = _unit(OPS / "cron" / "scmm-reprocess.service")
    out.append(("scmm-reprocess.service", _expand(unit["Service"]["ExecStart"], env)))
    out += [("crontab", _expand(cmd, env)) for _, cmd in _crontab()]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", _readme_section(), re.DOTALL)
    lines = [line for b in blocks for line in re.sub(r"\\\n\s*", " ", b).splitlines()]
    out += [("README", line) for line in lines if JOBS in line]
    return out


def test_commands_found():
    where = [w for w, _ in _commands()]
    assert sum(".yaml" in w for w in where) >= 2, "the RayJobs' entrypoints"
    assert {"scmm-reprocess.service", "crontab", "README"} <= set(where)


def test_every_referenced_job_module_exists():
    import importlib.util

    texts = {p: p.read_text() for p in _ops_files()} | {README: README.read_text()}
    modules = {m for t in texts.values() for m in re.findall(r"python -m scmm_atlas\.jobs\.(\w+)", t)}
    assert {"run", "train", "reprocess"} <= modules
    for m in sorted(modules):
        assert importlib.util.find_spec(f"scmm_atlas.jobs.{m}"), f"scmm_atlas/jobs/{m}.py does not exist"
    # no stale reference to the old top-level folders (pipelines/, configs/ beside the package)
    stale = {str(p): re.findall(r"python -m pipelines\.\w+|(?<![\w/])configs/[\w/.]+", t) for p, t in texts.items()}
    assert not {p: hits for p, hits in stale.items() if hits}


def _resolve_config(module: str, value: str) -> Any:
    """The config file a --config value names, as scmm_atlas.config / pipeline.config resolve it: a file
    (an absolute path inside the image is the repository's file), else a shipped config's name."""
    from scmm_atlas.config import find_config

    value = value.removeprefix(_image_root())
    found = find_config(ROOT / value) or find_config(value, "pipelines" if module == "run" else "")
    if found is None:
        pytest.fail(f"--config {value} ({module}) names no file in the repository and no shipped config")
    return found


@pytest.mark.parametrize("where,cmd", _commands(), ids=lambda v: v if len(v) < 40 else None)
def test_command_arguments_and_configs(where: str, cmd: str):
    args = _entrypoint_args(cmd)
    assert args is not None
    module = _split_command(cmd)[0].removeprefix("scmm_atlas.jobs.")
    # Cluster runs read and write a shared S3 store and a remote MLflow server.
    assert args.store and args.store.startswith("s3://"), f"{where}: --store {args.store}"
    assert args.tracking_uri and re.match(r"https?://", args.tracking_uri), f"{where}: --tracking-uri"
    assert args.ray_address is None, f"{where}: inside a Ray job the address comes from RAY_ADDRESS"
    if getattr(args, "config", None):
        path = _resolve_config(module, args.config)
        assert yaml.safe_load(path.read_text()), path


def test_job_submission_goes_to_a_loopback_job_server():
    """`ray job submit` always targets the head's job server through loopback (SSH tunnel / on the head)."""
    env = _env_file(OPS / "cron" / "reprocess.env.example")
    texts = [_expand(p.read_text(), env) for p in (OPS / "cron").iterdir() if p.suffix != ".example"]
    texts.append(_readme_section())
    addresses = [a for t in texts for a in re.findall(r"ray job submit\s+--address[ =](\S+)", t)]
    assert len(addresses) >= 3
    for a in addresses:
        assert re.fullmatch(r"\"?http://(127\.0\.0\.1|localhost):8265\"?", a), a


# ----------------------------------------------------------------------------------------------
# Ray cluster config (ray up)


def _cluster() -> dict:
    return yaml.safe_load((OPS / "ray" / "cluster-gpu.yaml").read_text())


def test_ray_cluster_config_matches_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_cluster(), schema)
    broken = _cluster()
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_ray_cluster_config_survives_ray_up_preparation():
    """What `ray up` does before it calls the cloud: merge the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_cluster()))
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    assert config["available_node_types"][config["head_node_type"]]["max_workers"] == 0
    # Our empty setup commands replace the defaults' (the image already has everything).
    assert config["setup_commands"] == [] and config["head_setup_commands"] == []


def test_ray_cluster_gpu_workers_and_cpu_head():
    cfg = _cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    gpu_family = re.compile(r"^(g\d+[a-z]*|p\d+[a-z]*)\.")
    assert head["resources"].get("GPU", 0) == 0 and not gpu_family.match(head["node_config"]["InstanceType"])
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpu_workers = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "no GPU worker node type"
    for t in gpu_workers:
        assert gpu_family.match(t["node_config"]["InstanceType"]), t["node_config"]["InstanceType"]
        assert t.get("max_workers", 0) >= 1 and t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"]
    assert cfg["docker"]["image"], "nodes run the project image"


def test_ray_cluster_keeps_the_job_server_private():
    cfg = _cluster()
    start = " ".join(cfg["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", start), start
    assert "0.0.0.0" not in start
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        assert not ports & {8265, 6379, 10001}, "the job server / GCS / client port must not be opened"
    for opt in cfg["docker"].get("run_options", []):
        m = re.match(r"--env[ =]([A-Z_0-9]+)=", opt)
        assert not (m and SECRETISH.search(m.group(1))), f"secret in run_options: {opt}"
        f = re.match(r"--env-file[ =](\S+)", opt)
        if f:  # the env file exists on the host before docker runs
            assert any(f.group(1) in c for c in cfg["initialization_commands"]), opt


# ----------------------------------------------------------------------------------------------
# Dockerfiles


def test_project_dockerfile():
    instrs = _dockerfile(OPS / "docker" / "Dockerfile")
    assert instrs[0][0] == "FROM"
    froms = [a for i, a in instrs if i == "FROM"]
    assert len(froms) == 1
    base = froms[0].split()[0]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-(?:cudnn\d*-)?(?:base|runtime|devel)-ubuntu\d+\.\d+", base) \
        or re.fullmatch(r"rayproject/ray:[\w.-]*-(?:gpu|cu(\d+?)(\d))", base)
    assert m, f"not a CUDA base image: {base}"
    runs = [a for i, a in instrs if i == "RUN"]
    torch_pin = next(d for d in _pyproject()["dependencies"] if d.startswith("torch"))
    torch_runs = [r for r in runs if "pip install" in r and torch_pin in r]
    assert len(torch_runs) == 1, f"one RUN installs {torch_pin}"
    index = re.search(r"--(?:extra-)?index-url[ =]https://download\.pytorch\.org/whl/cu(\d+)", torch_runs[0])
    assert index, "torch comes from a CUDA wheel index"
    if m.lastindex and m.group(1):  # the wheel's CUDA is the base image's (driver requirement)
        assert index.group(1) == m.group(1) + m.group(2), (index.group(1), base)
    assert any(re.search(r"python install 3\.11|python3\.11|py311", r) for r in runs), "Python 3.11"
    # The project: sources copied (they exist), then `pip install [-e] .` after them and after torch.
    copies = [(n, a) for n, (i, a) in enumerate(instrs) if i == "COPY" and not a.startswith("--from")]
    copied = {src for _, a in copies for src in a.split()[:-1]}
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    assert {"pyproject.toml", "scmm_atlas"} <= copied  # the configs and job entry points are inside the package
    installs = [n for n, (i, a) in enumerate(instrs) if i == "RUN" and re.search(r"pip install [^&]*(-e )?\.(\s|$)", a)]
    assert installs, "the project is never pip-installed"
    assert installs[-1] > max(n for n, _ in copies) and installs[-1] > instrs.index(("RUN", torch_runs[0]))
    # Non-root at run time, with HOME set in the image (`ray up` reads it from `docker inspect`).
    users = [(n, a) for n, (i, a) in enumerate(instrs) if i == "USER"]
    assert users and users[-1][1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert users[-1][0] > max(n for n, (i, _) in enumerate(instrs) if i == "RUN")
    env = {}
    for i, a in instrs:
        if i == "ENV":
            env |= dict(kv.split("=", 1) for kv in shlex.split(a))
    assert env.get("HOME", "").startswith("/home/"), "ENV HOME"
    assert any(i == "WORKDIR" for i, _ in instrs)
    ignore = (OPS / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert any(fnmatch.fnmatch(".venv", p.removeprefix("**/")) for p in ignore), "keep .venv out of the context"


def test_mlflow_dockerfile():
    import mlflow

    instrs = _dockerfile(OPS / "mlflow" / "Dockerfile")
    froms = [a for i, a in instrs if i == "FROM"]
    assert froms and froms[-1].startswith("python:3.11")
    run = " ".join(a for i, a in instrs if i == "RUN")
    m = re.search(r"mlflow(?:\[[\w,]+\])?==(\d+\.\d+)\.\d+", run)
    assert m, "pin the server's MLflow version"
    assert m.group(1) == ".".join(mlflow.__version__.split(".")[:2]), "server and clients: same MLflow minor"
    assert "psycopg2" in run and "boto3" in run, "PostgreSQL driver and S3 client"
    users = [a for i, a in instrs if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


# ----------------------------------------------------------------------------------------------
# MLflow server: docker compose


def _compose() -> dict:
    return yaml.safe_load((OPS / "mlflow" / "docker-compose.yaml").read_text())


def _compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_mlflow_server():
    services = _compose()["services"]
    mlflow = services["mlflow"]
    cmd = mlflow["command"]
    cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
    backend = re.search(r"--backend-store-uri[ =](\S+)", cmd)
    assert backend and re.match(r"(postgresql|mysql|mssql)(\+\w+)?://", backend.group(1)), cmd
    assert not re.search(r"://[^/@\s]+:[^/@\s]+@", backend.group(1)), "no password in the database URI"
    host = re.search(r"://(?:[^@/]+@)?([\w.-]+)", backend.group(1)).group(1)
    assert host in services, f"database host {host} is not a compose service"
    assert re.search(r"--artifacts-destination[ =]s3://", cmd) and "--serve-artifacts" in cmd
    db = services[host]
    assert re.match(r"(postgres|mysql|mariadb)[:@]", db["image"]), db["image"]
    assert "ports" not in db, "the database is not published"
    depends = mlflow.get("depends_on")
    assert host in (depends if isinstance(depends, list) else list(depends or {}))
    # The published port names a host interface (default loopback), never all interfaces.
    for p in mlflow["ports"]:
        p = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(p))  # compose's ${VAR:-default}, by default
        assert p.count(":") == 2 and p.split(":")[0] not in ("", "0.0.0.0"), p


def test_compose_has_no_literal_secrets():
    compose = _compose()
    for name, svc in compose["services"].items():
        for key, value in _compose_env(svc).items():
            if SECRETISH.search(key):
                assert WHOLE_SUBST.fullmatch(value), f"{name}: {key} must be a ${{VAR}} substitution"
    text = (OPS / "mlflow" / "docker-compose.yaml").read_text()
    example = OPS / "mlflow" / "mlflow.env.example"
    defined = set(_env_file(example))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    assert used and used <= defined, f"not in {example.name}: {used - defined}"
    env_files = compose["services"]["mlflow"].get("env_file")
    for f in [env_files] if isinstance(env_files, str) else env_files or []:
        f = f["path"] if isinstance(f, dict) else f
        assert (OPS / "mlflow" / f"{f}.example").is_file(), f"{f} has no .example template"
        assert _git_ignored(OPS / "mlflow" / f), f"{f} (secrets) is not git-ignored"


def _git_ignored(path: Path) -> bool:
    patterns = [p for p in (OPS / ".gitignore").read_text().split() if not p.startswith("#")]
    ignored = False
    for p in patterns:
        if p.startswith("!"):
            ignored = ignored and not fnmatch.fnmatch(path.name, p[1:])
        elif fnmatch.fnmatch(path.name, p):
            ignored = True
    return ignored


def test_env_templates_hold_no_secrets():
    templates = list(OPS.rglob("*.env.example"))
    assert len(templates) >= 2
    for t in templates:
        for key, value in _env_file(t).items():
            if SECRETISH.search(key):
                assert value == "", f"{t.name}: {key} must be empty in the template"


def test_no_credentials_anywhere_in_ops():
    patterns = [
        re.compile(r"AKIA[0-9A-Z]{16}"),                                   # AWS access key id
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        re.compile(r"\b[a-z][a-z0-9+]*://[^/\s:@${}]+:[^/\s@${}]+@"),       # user:password@ in a URI
        re.compile(r"(?i)(secret_access_key|password)[ \t]*[:=][ \t]*['\"]?[A-Za-z0-9/+=]{12,}"),
    ]
    for path in [*_ops_files(), README]:
        text = path.read_text() if path != README else _readme_section()
        for pat in patterns:
            assert not pat.search(text), f"{path}: {pat.pattern}"


# ----------------------------------------------------------------------------------------------
# systemd timer and crontab


def test_systemd_service():
    unit = _unit(OPS / "cron" / "scmm-reprocess.service")
    assert unit["Unit"]["Description"]
    service = unit["Service"]
    assert service["Type"] == "oneshot"
    exec_start = service["ExecStart"]
    assert exec_start.startswith("/"), "ExecStart needs an absolute path"
    assert "ray job submit" in exec_start and "python -m scmm_atlas.jobs.reprocess" in exec_start
    assert not re.search(r"%[^%]", exec_start.replace("%%", "")), "systemd would expand % specifiers"
    # Every ${VAR} comes from the EnvironmentFile, whose template defines it.
    assert service["EnvironmentFile"].lstrip("-") == "/etc/scmm-atlas/reprocess.env"
    env = _env_file(OPS / "cron" / "reprocess.env.example")
    used = set(re.findall(r"\$\{(\w+)\}", exec_start))
    assert used and used <= set(env), used - set(env)
    assert service.get("User") not in (None, "root"), "run as an unprivileged user"


def test_systemd_timer():
    timer = _unit(OPS / "cron" / "scmm-reprocess.timer")
    on_calendar = timer["Timer"]["OnCalendar"]
    keywords = {"minutely", "hourly", "daily", "weekly", "monthly", "yearly", "quarterly", "semiannually"}
    m = re.fullmatch(r"(?:[A-Z][a-z]{2}(?:[.,][A-Z][a-z]{2})*\s+)?(?:([\d*]+)-([\d*]+)-([\d*]+)\s+)?"
                     r"(\d{1,2}|\*):(\d{2}|\*)(?::(\d{2}|\*))?", on_calendar)
    assert on_calendar in keywords or m, on_calendar
    if m:
        hour, minute = m.group(4), m.group(5)
        assert (hour == "*" or int(hour) <= 23) and (minute == "*" or int(minute) <= 59), on_calendar
    assert (OPS / "cron" / timer["Timer"].get("Unit", "scmm-reprocess.service")).is_file()
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_crontab():
    jobs = _crontab()
    assert jobs
    for schedule, command in jobs:
        assert _cron_ok(schedule), schedule
        assert "%" not in command, "cron turns % into a newline"
        assert "ray job submit" in command and "python -m scmm_atlas.jobs.reprocess" in command
        assert "/etc/scmm-atlas/reprocess.env" in command


# ----------------------------------------------------------------------------------------------
# Documentation


def test_readme_section_and_paths():
    text = README.read_text()
    assert text.count(SECTION) == 1
    after = text[text.index(SECTION) + len(SECTION):]
    assert re.search(r"\n## (.+)", after).group(1) == "Benchmarks", "the section sits right before Benchmarks"
    section = _readme_section()
    for needed in ("ray up", "ray dashboard", "ray job submit", "kubectl", "MLFLOW_TRACKING_URI",
                   "scmm-atlas query"):
        assert needed in section, needed
    for doc in (section, (OPS / "README.md").read_text()):
        for ref in re.findall(r"\bops/[\w./-]*[\w/]", doc):
            assert (ROOT / ref).exists(), f"{ref} is mentioned but does not exist"
    listed = (OPS / "README.md").read_text()
    for p in _ops_files():
        rel = str(p.relative_to(OPS))
        if p.name not in ("README.md", ".gitignore"):
            assert rel in listed, f"ops/README.md does not list {rel}"
