"""The deployment files under cluster/ and the Ray Job entry points under jobs/, without starting Ray.

- every YAML parses; RayCluster / RayJob / ``ray up`` files have the fields their tools need
  (``ray up``'s against the schema bundled with the installed Ray);
- Ray, Python and torch versions in manifests, image tags, pip lines and comments agree with
  pyproject.toml;
- nothing is published (no LoadBalancer/NodePort/Ingress, dashboard on loopback for ``ray up``,
  no security-group rule for 8265/5000), token auth is on, MLflow asks every client for a login
  (basic-auth, credentials from a Secret / a mounted file) and the shared mount is not
  world-writable, and the multi-node settings (shared volume, in-cluster MLflow, Gloo interface)
  are in place;
- every file has a GPU worker group (nvidia.com/gpu, Ray's GPU image, the CUDA build of the pinned
  torch) with the CPU workers' login, env and mounts, and the RayJob's GPU --set keys resolve;
- jobs/*.py run ``--help`` of their subcommand, with ``--smoke-test`` in it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
JOBS = REPO / "jobs"
SHARED = "/mnt/shared"
JOB_SCRIPTS = {"train": "train.py", "tune": "tune.py", "retrain": "retrain.py", "twotower": "twotower.py"}
PUBLIC_PORTS = (8265, 5000)  # Ray dashboard / job server, MLflow

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPS = {canonicalize_name(r.name): r for r in map(Requirement, PYPROJECT["project"]["dependencies"])}
REQUIRES_PYTHON = SpecifierSet(PYPROJECT["project"]["requires-python"])
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # same safe subset, in C when available


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def text_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml", ".md"))


@functools.cache
def load(path: Path) -> list[dict]:
    """The documents of a YAML file (parsed once; the tests only read them)."""
    return [d for d in yaml.load_all(path.read_text(), Loader=SAFE_LOADER) if d is not None]


def k8s_docs(kind: str | None = None) -> list[tuple[Path, dict]]:
    out = []
    for p in yaml_files():
        for d in load(p):
            if isinstance(d, dict) and "apiVersion" in d and (kind is None or d.get("kind") == kind):
                out.append((p, d))
    return out


def ray_up() -> dict:
    (doc,) = load(CLUSTER / "ray-up.yaml")
    return doc


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayClusterSpec: RayCluster.spec and RayJob.spec.rayClusterSpec."""
    specs = [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in k8s_docs("RayCluster")]
    specs += [(f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"])
              for p, d in k8s_docs("RayJob") if "rayClusterSpec" in d["spec"]]
    return specs


def pods(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod spec) of the head and every worker group."""
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return out


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def runtime_envs() -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], yaml.safe_load(d["spec"]["runtimeEnvYAML"]))
            for _, d in k8s_docs("RayJob") if d["spec"].get("runtimeEnvYAML")]


def walk(node):
    """Every (key, value) pair of a nested YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


# --------------------------------------------------------------------------- jobs/ --help, in parallel

def rayjob_print_config_argv() -> list[str] | None:
    """The RayJob's entrypoint as it runs in the job, with ``--print-config`` (train only)."""
    try:
        jobs = k8s_docs("RayJob")
    except yaml.YAMLError:  # test_yaml_parses reports it
        return None
    if len(jobs) != 1:
        return None
    argv = shlex.split(jobs[0][1]["spec"]["entrypoint"])
    if argv[:2] != ["python", "jobs/train.py"]:
        return None
    return [sys.executable, *argv[1:], "--print-config"]


def rayjob_gpu_sets() -> list[str] | None:
    """The ``--set`` arguments rayjob.yaml gives for a GPU run: a comment line that starts with
    ``--set run.device=cuda``, appended to the entrypoint."""
    text = (CLUSTER / "kuberay" / "rayjob.yaml").read_text()
    m = re.search(r"^\s*#\s*(--set run\.device=cuda\b.*)$", text, re.MULTILINE)
    return shlex.split(m.group(1)) if m else None


@pytest.fixture(scope="module", autouse=True)
def job_runs():
    """``python jobs/<x>.py --help`` for every script and the RayJob's entrypoint with
    ``--print-config``, all started at once (each imports torch; they overlap the YAML tests)."""
    commands = {name: [sys.executable, str(JOBS / script), "--help"]
                for name, script in JOB_SCRIPTS.items() if (JOBS / script).is_file()}
    entry = rayjob_print_config_argv()
    if entry:
        commands["rayjob-entrypoint"] = entry
        gpu_sets = rayjob_gpu_sets()
        if gpu_sets:
            commands["rayjob-gpu-entrypoint"] = [*entry[:-1], *gpu_sets, entry[-1]]
    procs = {name: subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    results: dict[str, tuple[int, str, str]] = {}

    def get(name: str) -> tuple[int, str, str]:
        if name not in procs:
            pytest.fail(f"{name} was not started (script or train entrypoint missing)")
        if name not in results:
            out, err = procs[name].communicate(timeout=120)
            results[name] = (procs[name].returncode, out, err)
        return results[name]

    yield get
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------- (a) parsing

def test_expected_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in text_files()}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "ray-up.yaml",
            "mlflow-server.md", "README.md"} <= names, names
    assert (JOBS / "README.md").is_file()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


# --------------------------------------------------------------------------- (b) structure

def test_raycluster_structure():
    ((_, rc),) = k8s_docs("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and g["template"]["spec"]["containers"][0]["image"]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]


def test_rayjob_structure():
    ((_, job),) = k8s_docs("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "exactly one of the two"
    if "rayClusterSpec" in spec:
        assert spec["rayClusterSpec"]["rayVersion"]
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert spec.get("shutdownAfterJobFinishes") is True
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
    assert (REPO / argv[1]).is_file(), f"entrypoint names {argv[1]}, not in the repo"
    for flag in ("--config", "--space"):
        if flag in argv:
            assert (REPO / argv[argv.index(flag) + 1]).is_file(), flag


def test_rayjob_entrypoint_config_resolves(job_runs):
    """The entrypoint, run as the job runs it plus --print-config, gives a valid TrainConfig whose
    data and checkpoints are on the shared volume."""
    rc, out, err = job_runs("rayjob-entrypoint")
    assert rc == 0, err
    cfg = json.loads(out)
    assert cfg["data"]["path"].startswith(SHARED + "/"), cfg["data"]
    assert cfg["run"]["storage_path"].startswith(SHARED + "/"), cfg["run"]


def test_rayjob_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    envs = runtime_envs()
    assert envs
    for name, env in envs:
        RuntimeEnv(**env)  # raises on unknown fields and malformed working_dir / pip
        wd = env.get("working_dir")
        if wd:  # a RayJob's submitter cannot upload a local directory: it must be an archive URI
            assert urlparse(wd).scheme and wd.endswith((".zip", ".tar.gz", ".tgz")), (name, wd)


def test_ray_up_structure_and_schema():
    import jsonschema

    cfg = ray_up()
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        assert cfg.get(key), key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    ray_root = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    schema = json.loads((ray_root / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


# --------------------------------------------------------------------------- (c) versions

def ray_spec() -> SpecifierSet:
    return DEPS["ray"].specifier


IMAGE = re.compile(r"rayproject/ray(?:-ml|-llm)?:([^\s\"'`,)]+)")
IMAGE_TAG = re.compile(r"^(\d+\.\d+\.\d+)-py(\d)(\d+)(?:-[a-z0-9]+)*$")


def test_ray_version_fields_match_pyproject():
    specs = cluster_specs()
    assert len(specs) >= 2
    for where, spec in specs:
        assert Version(str(spec["rayVersion"])) in ray_spec(), (where, spec["rayVersion"], str(ray_spec()))


def test_image_tags_match_ray_pin_and_requires_python():
    """Every rayproject image named anywhere in cluster/ (fields and comments): Ray version inside
    the pyproject pin, explicit Python tag inside requires-python; the manifests' own image fields
    agree with rayVersion."""
    found = []
    for path in text_files():
        for tag in IMAGE.findall(path.read_text()):
            m = IMAGE_TAG.match(tag)
            assert m, f"{path.name}: image tag {tag!r} lacks <ray version>-py<python>"
            ray_v, py = m.group(1), f"{m.group(2)}.{m.group(3)}"
            assert Version(ray_v) in ray_spec(), (path.name, tag)
            assert REQUIRES_PYTHON.contains(py), (path.name, tag, str(REQUIRES_PYTHON))
            found.append(tag)
    assert found, "no rayproject/ray image named under cluster/"
    for where, spec in cluster_specs():
        for group, pod in pods(spec):
            for c in pod["containers"]:
                if "rayproject/ray" in c["image"]:
                    assert c["image"].split(":")[1].startswith(f"{spec['rayVersion']}-"), (where, group)
    assert ray_up()["docker"]["image"].startswith("rayproject/ray:")


def pip_install_requirements(command: str) -> list[Requirement]:
    """The requirement arguments of every ``pip install`` in a shell command line."""
    out = []
    for part in re.split(r"&&|;|\|\|", command):
        argv = shlex.split(part)
        for i in range(len(argv) - 1):
            if argv[i] == "pip" and argv[i + 1] == "install":
                args, skip = argv[i + 2:], False
                for a in args:
                    if skip:
                        skip = False
                    elif a in ("-e", "--editable", "-r", "--requirement", "-c", "--constraint",
                               "--index-url", "-i", "--extra-index-url", "-f", "--find-links"):
                        skip = True
                    elif not a.startswith(("-", "~", ".", "/")):
                        out.append(Requirement(a))
    return out


def check_pins(reqs: list[Requirement], where: str) -> None:
    for r in reqs:
        pinned = DEPS.get(canonicalize_name(r.name))
        if pinned is not None:
            assert r.specifier == pinned.specifier, (where, str(r), str(pinned))
            assert r.extras == pinned.extras, (where, str(r), str(pinned))


def test_ray_up_pip_pins_match_pyproject():
    cfg = ray_up()
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in cfg.get(key) or []]
    commands += [c for t in cfg["available_node_types"].values() for c in t.get("worker_setup_commands") or []]
    reqs = [r for c in commands for r in pip_install_requirements(c)]
    assert {"ray", "torch"} <= {canonicalize_name(r.name) for r in reqs}, reqs
    check_pins(reqs, "ray-up.yaml setup commands")
    assert any(re.search(r"pip install (-e )?~/ray-pinet\b", c) for c in commands), "the package itself"


def test_rayjob_pip_list_is_pyproject_minus_ray():
    for name, env in runtime_envs():
        pip = env.get("pip")
        if pip is None:
            continue
        packages = pip["packages"] if isinstance(pip, dict) else pip
        reqs = [Requirement(p) for p in packages]
        check_pins(reqs, f"RayJob {name} pip")
        assert {canonicalize_name(r.name) for r in reqs} == set(DEPS) - {"ray"}, name


PIN = re.compile(r"\bray\[[a-z,\s]+\]\s*==\s*[0-9][0-9.*]*|\btorch\s*==\s*[0-9][0-9.a-z+*]*")


def test_pins_in_all_text_match_pyproject():
    """ray[...]==X and torch==X wherever they are written under cluster/, comments included."""
    seen = set()
    for path in text_files():
        text = path.read_text()
        for m in PIN.finditer(text):
            r = Requirement(m.group(0).replace(" ", ""))
            check_pins([r], f"{path.name}: {m.group(0)}")
            seen.add(canonicalize_name(r.name))
    assert seen == {"ray", "torch"}, seen


def test_mlflow_server_image_matches_client_pin():
    images = [c["image"] for _, d in k8s_docs("Deployment")
              for c in d["spec"]["template"]["spec"]["containers"] if "mlflow" in c["image"]]
    assert images
    for image in images:
        version = image.rsplit(":", 1)[1].lstrip("v")
        assert Version(version) in DEPS["mlflow"].specifier, image


# --------------------------------------------------------------------------- (d) nothing published

def test_no_public_services_or_ingress():
    for path, d in k8s_docs():
        assert d["kind"] not in ("Ingress", "IngressClass", "Gateway", "HTTPRoute", "Route"), path.name
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", (path.name, d["metadata"]["name"])
            assert not d["spec"].get("externalIPs"), path.name
        for key, value in walk(d):
            assert not (key == "hostNetwork" and value), path.name
            assert key != "hostPort", path.name
    for where, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress"), where
        svc_type = head.get("headService", {}).get("spec", {}).get("type", "ClusterIP")
        assert svc_type == "ClusterIP", where


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    return rule.get("FromPort", -1) <= port <= rule.get("ToPort", -1)


def test_ray_up_dashboard_on_loopback_and_no_open_ports():
    cfg = ray_up()
    commands = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
                for c in cfg[key]]
    heads = [c for c in commands if "ray start --head" in c]
    assert heads
    for c in heads:
        assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", c), c
    hosts = re.findall(r"--dashboard-host[= ](\S+)", " ".join(commands))
    assert hosts and set(hosts) == {"127.0.0.1"}, hosts
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        for port in PUBLIC_PORTS:
            assert not _covers(rule, port), (port, rule)
    for node in cfg["available_node_types"].values():
        assert "SecurityGroupIds" not in node["node_config"], "use the group ray up creates"
    run_options = " ".join(cfg.get("docker", {}).get("run_options", []))
    assert not re.search(r"(^|\s)(-p|--publish)(\s|=)", run_options), run_options


# --------------------------------------------------------------------------- auth and multi-node settings

def test_token_auth_on_everywhere():
    for where, spec in cluster_specs():
        assert spec.get("authOptions", {}).get("mode") == "token", where
    cfg = ray_up()
    run_options = cfg["docker"]["run_options"]
    assert "--env=RAY_AUTH_MODE=token" in run_options, run_options
    assert any(k.endswith(".ray/auth_token") for k in cfg["file_mounts"]), "the token on every node"


def ray_up_commands() -> list[str]:
    cfg = ray_up()
    return [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                          "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
            for c in cfg.get(key) or []]


def test_ray_up_shared_mount_is_not_world_writable():
    """The shared mount holds checkpoints, prepared data and the MLflow stores: another account
    on a node must not rewrite them (was ``chmod 1777``). Every chmod of it leaves others no
    access, and it is given to the container's user/group."""
    modes = []
    for c in ray_up_commands():
        for part in re.split(r"&&|;|\|\|", c):
            argv = shlex.split(part) if re.search(r"\bchmod\b", part) else []
            if "chmod" in argv and argv[-1].rstrip("/") == SHARED:
                mode = argv[argv.index("chmod") + 1]
                assert re.fullmatch(r"[0-7]{3,4}", mode), f"use an octal mode: {part}"
                assert int(mode, 8) & 0o007 == 0, f"others may use {SHARED}: {part}"
                modes.append(mode)
            assert not re.search(r"\b(chmod|setfacl)\b.*\b(o|a)[+=][rwx]*w", part), part
    assert modes, f"no chmod of {SHARED}: its mode would be the file system's default"
    assert any(re.search(rf"\bch(own|grp) \S+ {SHARED}\b", c) for c in ray_up_commands()), \
        "the mount must belong to the container's user or group (chown/chgrp)"


def mlflow_server_commands() -> list[tuple[str, str, dict]]:
    """(where, command line, container env) of every ``mlflow server`` that cluster/ starts."""
    out = []
    for _, d in k8s_docs("Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            line = " ".join(c.get("command", []) + c.get("args", []))
            if "mlflow server" in line:
                out.append((f"Deployment {d['metadata']['name']}", line, c))
    out += [("ray-up.yaml", c, {}) for c in ray_up_commands() if "mlflow server" in c]
    return out


def test_mlflow_server_requires_a_login():
    """An MLflow server that listens beyond the loopback runs the basic-auth app (with Flask-WTF,
    which it needs), its admin password comes from a Secret or the mounted credentials file, never
    from the manifest; users other than the admin get no permission."""
    servers = mlflow_server_commands()
    assert len(servers) >= 2, servers
    for where, line, container in servers:
        host = re.search(r"--host[= ](\S+)", line)
        if host and host.group(1) in ("127.0.0.1", "localhost"):
            continue
        assert re.search(r"--app-name[= ]basic-auth\b", line), (where, line)
        assert "default_permission = NO_PERMISSIONS" in line, (where, line)
        if container:
            env = {e["name"]: e for e in container.get("env", [])}
            for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                        "MLFLOW_FLASK_SERVER_SECRET_KEY"):
                assert "secretKeyRef" in env.get(var, {}).get("valueFrom", {}), (where, var)
            assert "Flask-WTF" in line, where
        else:
            assert "~/.mlflow/credentials" in line, "the admin account is the mounted one"
            assert any("pip install Flask-WTF" in c for c in ray_up()["head_setup_commands"])


def test_every_mlflow_client_has_the_login():
    """Every Ray pod that logs to the in-cluster server gets the user and password from the
    Secret the server's admin comes from; every ``ray up`` node gets the credentials file."""
    secrets = {e["valueFrom"]["secretKeyRef"]["name"]
               for _, _, c in mlflow_server_commands() if c for e in c["env"]
               if e["name"] == "MLFLOW_AUTH_ADMIN_PASSWORD"}
    assert len(secrets) == 1, secrets
    for where, spec in cluster_specs():
        for group, pod in pods(spec):
            for c in pod["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
                    assert ref.get("name") in secrets, (where, group, var)
    assert any(k.endswith(".mlflow/credentials") for k in ray_up()["file_mounts"]), \
        "the MLflow login on every ray up node"


def test_every_ray_pod_mounts_the_shared_rwx_volume():
    pvcs = {d["metadata"]["name"]: d for _, d in k8s_docs("PersistentVolumeClaim")}
    copies = [d for _, d in k8s_docs("PersistentVolumeClaim")]
    for d in copies:  # one claim, written identically in every file that declares it
        assert d == pvcs[d["metadata"]["name"]]
    for where, spec in cluster_specs():
        for group, pod in pods(spec):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                      for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            for c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert SHARED in mounts, (where, group)
                claim = claims[mounts[SHARED]]
                assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], claim


def mlflow_service_urls() -> set[str]:
    urls = set()
    for _, d in k8s_docs("Service"):
        name, ns = d["metadata"]["name"], d["metadata"].get("namespace", "default")
        for p in d["spec"]["ports"]:
            for host in (f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
                urls.add(f"http://{host}:{p['port']}")
    return urls


def test_mlflow_uri_is_the_in_cluster_service():
    urls = mlflow_service_urls()
    assert urls, "no Service for MLflow"
    for where, spec in cluster_specs():
        job_env = {}
        for name, env in runtime_envs():
            if where.endswith(f":{name}"):
                job_env = env.get("env_vars", {})
        for group, pod in pods(spec):
            for c in pod["containers"]:
                uri = job_env.get("MLFLOW_TRACKING_URI") or env_of(c).get("MLFLOW_TRACKING_URI")
                assert uri in urls, (where, group, uri, sorted(urls))
    hosts = " ".join(c for c in ray_up()["worker_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in hosts


def test_gloo_interface_set_for_the_nodes_not_loopback():
    """Gloo must leave the loopback on a cluster: every Ray pod and the ray-up containers name a
    real interface (ray-pinet only defaults to loopback when it starts Ray on one machine)."""
    for where, spec in cluster_specs():
        for group, pod in pods(spec):
            for c in pod["containers"]:
                assert env_of(c).get("GLOO_SOCKET_IFNAME") not in (None, "", "lo"), (where, group)
    run_options = " ".join(ray_up()["docker"]["run_options"])
    m = re.search(r"--env=GLOO_SOCKET_IFNAME=(\S+)", run_options)
    assert m and m.group(1) != "lo", run_options


# --------------------------------------------------------------------------- (e) jobs/

@pytest.mark.parametrize("name", list(JOB_SCRIPTS))
def test_job_script_is_a_thin_forwarder(name):
    path = JOBS / JOB_SCRIPTS[name]
    assert path.is_file(), path
    src = path.read_text()
    tree = ast.parse(src)
    doc = ast.get_docstring(tree) or ""
    assert f"python jobs/{JOB_SCRIPTS[name]}" in doc
    assert "ray job submit" in doc or "ray-pinet submit" in doc
    assert "from ray_pinet.cli import main" in src
    assert f'main(["{name}", *sys.argv[1:]])' in src
    defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not defs, f"no logic of its own: {defs}"


@pytest.mark.parametrize("name", list(JOB_SCRIPTS))
def test_job_script_help_has_smoke_test(name, job_runs):
    rc, out, err = job_runs(name)
    if name == "retrain" and rc == 2 and "invalid choice" in err:
        pytest.skip("`ray-pinet retrain` is not in the CLI yet")
    assert rc == 0, err
    assert f"ray-pinet {name}" in out, out[:300]
    assert "--smoke-test" in out


def test_jobs_readme_names_every_script():
    text = (JOBS / "README.md").read_text()
    for script in JOB_SCRIPTS.values():
        assert f"jobs/{script}" in text, script
    assert "--smoke-test" in text and "ray job submit" in text and "ray-pinet submit" in text


# --------------------------------------------------------------------------- (f) GPU workers (issue 19)

GPU = "nvidia.com/gpu"
# PyTorch's CUDA wheel indexes (cu118, cu126, ...); /whl/cpu is the CPU one.
CUDA_INDEX = re.compile(r"^https://download\.pytorch\.org/whl/cu\d{3}/?$")
INDEX_OPTIONS = ("--index-url", "-i", "--extra-index-url")
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.")


def gpus(container: dict, kind: str) -> int:
    return int(container.get("resources", {}).get(kind, {}).get(GPU, 0))


def worker_groups(spec: dict) -> tuple[list[dict], list[dict]]:
    """(CPU worker groups, GPU worker groups) of a RayClusterSpec: a GPU group's pods ask for
    nvidia.com/gpu in their limits."""
    cpu, gpu = [], []
    for g in spec["workerGroupSpecs"]:
        has = any(gpus(c, "limits") for c in g["template"]["spec"]["containers"])
        (gpu if has else cpu).append(g)
    return cpu, gpu


def cuda_torch_installs(command: str) -> list[Requirement]:
    """The torch requirements of every ``pip install`` in a shell command line that reads a CUDA
    wheel index of PyTorch (``--index-url`` / ``--extra-index-url``)."""
    out = []
    for part in re.split(r"&&|;|\|\|", command):
        argv = shlex.split(part)
        for i in range(len(argv) - 1):
            if argv[i:i + 2] == ["pip", "install"]:
                args = argv[i + 2:]
                urls = [args[j + 1] for j, a in enumerate(args[:-1]) if a in INDEX_OPTIONS]
                urls += [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in INDEX_OPTIONS and "=" in a]
                if any(CUDA_INDEX.match(u) for u in urls):
                    out += [r for r in pip_install_requirements(part) if canonicalize_name(r.name) == "torch"]
    return out


def container_command(c: dict) -> str:
    """What KubeRay runs before ``ray start`` in a Ray container: its command and args, joined."""
    return " ".join(c.get("command", []) + c.get("args", []))


def test_every_kuberay_cluster_has_a_gpu_worker_group():
    """Beside the CPU workers, a group whose pods request nvidia.com/gpu (requests = limits, as
    Kubernetes wants for extended resources), run Ray's GPU image, tolerate the GPU nodes' taint,
    and advertise their GPUs to Ray (KubeRay derives --num-gpus from the limit; an explicit
    num-gpus must agree with it)."""
    for where, spec in cluster_specs():
        cpu, gpu = worker_groups(spec)
        assert cpu and gpu, (where, [g["groupName"] for g in spec["workerGroupSpecs"]])
        for g in gpu:
            pod = g["template"]["spec"]
            for c in pod["containers"]:
                limit = gpus(c, "limits")
                assert limit >= 1 and gpus(c, "requests") == limit, (where, g["groupName"], c["resources"])
                num_gpus = g.get("rayStartParams", {}).get("num-gpus")
                assert num_gpus is None or int(num_gpus) == limit, (where, g["groupName"], num_gpus)
                assert re.fullmatch(r"rayproject/ray:\S+-gpu", c["image"]), (where, g["groupName"], c["image"])
            assert any(t.get("key") == GPU and t.get("operator") == "Exists" for t in pod.get("tolerations", [])), \
                (where, g["groupName"], "no toleration for the nvidia.com/gpu taint")
        assert not any(gpus(c, "limits") for c in spec["headGroupSpec"]["template"]["spec"]["containers"]), where


def test_kuberay_gpu_group_installs_the_cuda_build_of_the_pinned_torch():
    """Ray's GPU image has no torch: the GPU pods install the pyproject pin from a CUDA wheel
    index before ``ray start`` (a job's ``torch==<pin>`` is then already satisfied there, so the
    CPU index of a job's pip list does not replace it)."""
    for where, spec in cluster_specs():
        assert worker_groups(spec)[1], (where, "no GPU worker group")
        for g in worker_groups(spec)[1]:
            for c in g["template"]["spec"]["containers"]:
                reqs = cuda_torch_installs(container_command(c))
                assert reqs, (where, g["groupName"], container_command(c))
                check_pins(reqs, f"{where} {g['groupName']}")


def test_kuberay_gpu_group_has_the_cpu_workers_env_secrets_and_mounts():
    """The GPU pods log to MLflow with the same login from the Secret, use the same Gloo interface,
    mount the same shared volume and /dev/shm, and write as the same group as the CPU workers."""
    def env(c: dict) -> list[str]:
        return sorted(json.dumps(e, sort_keys=True) for e in c.get("env", []))

    for where, spec in cluster_specs():
        cpu, gpu = worker_groups(spec)
        assert cpu and gpu, where
        ref_pod = cpu[0]["template"]["spec"]
        (ref,) = ref_pod["containers"]
        for g in gpu:
            pod = g["template"]["spec"]
            for c in pod["containers"]:
                assert env(c) == env(ref), (where, g["groupName"])
                assert c.get("volumeMounts") == ref.get("volumeMounts"), (where, g["groupName"])
            assert pod.get("volumes") == ref_pod.get("volumes"), (where, g["groupName"])
            assert pod.get("securityContext") == ref_pod.get("securityContext"), (where, g["groupName"])


def test_rayjob_can_scale_its_gpu_group_for_a_gpu_run():
    """The RayJob's GPU group starts no pod for a CPU run and is autoscaled for a GPU one: the
    shown GPU --set keys fit in it (run.num_workers x run.gpus_per_worker GPUs)."""
    ((_, job),) = k8s_docs("RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert spec.get("enableInTreeAutoscaling") is True
    (gpu,) = worker_groups(spec)[1]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1, gpu
    sets = dict(s.split("=", 1) for s in (rayjob_gpu_sets() or [])[1::2])
    assert "run.gpus_per_worker" in sets, sets
    need = float(sets["run.gpus_per_worker"]) * int(sets.get("run.num_workers", "1"))
    have = gpu["maxReplicas"] * gpus(gpu["template"]["spec"]["containers"][0], "limits")
    assert 0 < need <= have, (sets, have)


def test_rayjob_gpu_entrypoint_config_resolves(job_runs):
    """The entrypoint with the GPU run's --set keys (a comment in rayjob.yaml) gives a valid
    TrainConfig on CUDA, GPUs per worker, and data and checkpoints on the shared volume."""
    sets = rayjob_gpu_sets()
    assert sets, "rayjob.yaml shows no GPU run (a comment line: --set run.device=cuda ...)"
    assert all(a == "--set" for a in sets[0::2]), sets
    rc, out, err = job_runs("rayjob-gpu-entrypoint")
    assert rc == 0, err
    cfg = json.loads(out)
    assert cfg["run"]["device"] == "cuda", cfg["run"]
    assert cfg["run"]["gpus_per_worker"] >= 1, cfg["run"]
    assert cfg["run"]["precision"] in ("fp32", "bf16"), cfg["run"]
    assert cfg["data"]["path"].startswith(SHARED + "/"), cfg["data"]
    assert cfg["run"]["storage_path"].startswith(SHARED + "/"), cfg["run"]


def test_ray_up_has_a_gpu_node_type():
    """A ``ray up`` node type with a GPU instance, Ray's GPU image and its own setup: the same
    pinned Ray and the package as every node, torch from a CUDA index (its worker_setup_commands
    replace the global setup_commands, whose torch is the CPU wheel). It keeps the global
    initialization (the shared mount's owner and mode) and run options (token, Gloo interface)."""
    cfg = ray_up()
    types = {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}
    assert types, list(cfg["available_node_types"])
    for name, t in types.items():
        assert name != cfg["head_node_type"], "no training on the head"
        assert t.get("max_workers", 0) >= 1, name
        assert GPU_INSTANCE.match(t["node_config"]["InstanceType"]), (name, t["node_config"]["InstanceType"])
        image = t.get("docker", {}).get("worker_image", cfg["docker"]["image"])
        assert re.fullmatch(r"rayproject/ray:\S+-gpu", image), (name, image)
        commands = t.get("worker_setup_commands") or []
        cuda = [r for c in commands for r in cuda_torch_installs(c)]
        assert cuda, (name, commands)
        check_pins(cuda, f"ray-up.yaml {name}")
        reqs = [r for c in commands for r in pip_install_requirements(c)]
        assert "ray" in {canonicalize_name(r.name) for r in reqs}, (name, commands)
        check_pins(reqs, f"ray-up.yaml {name}")
        assert not any("whl/cpu" in c for c in commands), (name, "the CPU wheel of torch")
        assert any(re.search(r"pip install (-e )?~/ray-pinet\b", c) for c in commands), (name, "the package")
        assert "initialization_commands" not in t, (name, "would replace the shared mount's set-up")
        assert not t.get("docker", {}).get("worker_run_options"), name
    for name, t in cfg["available_node_types"].items():
        if name not in types:
            assert not any(cuda_torch_installs(c) for c in t.get("worker_setup_commands") or []), name
