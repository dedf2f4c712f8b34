"""The deploy files as written: the Kubernetes manifests (schemas, offline, and what the schemas
cannot check), the serving image's Dockerfile and the argv its entry point gives ``vsteer serve``.

No cluster and no container engine: the schemas are kubernetes-validate's bundled ones, and the
image's entry point runs here with a stand-in ``vsteer`` that records its arguments; those are
then parsed by the real ``vsteer serve`` up to the point where it would start vLLM.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

import kubernetes_validate

from vsteer.server.serve import STOCK_ENTRY

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
#: the Kubernetes version the manifests are checked against (fixed: the bundled schemas change)
K8S_VERSION = "1.33.0"
#: strings that must not appear in a deploy file (API keys, placeholder keys)
FORBIDDEN = ("sk-", "replace-me", '"keys"')


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents() -> list[tuple[str, dict]]:
    """Every resource under deploy/k8s/ as (``file:kind/name``, resource)."""
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.relative_to(REPO)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def pod_specs() -> list[tuple[str, dict]]:
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"])
            for _, doc in documents() if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def validate(doc: dict) -> None:
    """Strict schema check (unknown fields are errors); raises on any mistake, an unknown kind included."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- Kubernetes schemas ----------------------------------------------------------------------


def test_manifests_exist():
    assert manifest_files(), "no manifest under deploy/k8s/"
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("name,doc", documents(), ids=[name for name, _ in documents()])
def test_manifest_matches_kubernetes_schema(name, doc):
    validate(doc)


def deployment() -> dict:
    (dep,) = of_kind("Deployment")
    return dep


@pytest.mark.parametrize("mistake", ["misspelled field", "wrong type", "unknown resource field", "missing field"])
def test_schema_check_catches_mistakes(mistake):
    """The validator reports real mistakes in a copy of the Deployment (so the check above can fail)."""
    dep = copy.deepcopy(deployment())
    container = dep["spec"]["template"]["spec"]["containers"][0]
    if mistake == "misspelled field":
        container["volumeMount"] = container.pop("volumeMounts")
    elif mistake == "wrong type":
        dep["spec"]["replicas"] = "two"
    elif mistake == "unknown resource field":
        container["resources"]["limit"] = container["resources"].pop("limits")
    else:
        del container["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)


def test_schema_check_refuses_unknown_kinds():
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "v1", "kind": "Deplyment", "metadata": {"name": "x"}})


# --- what the schemas cannot check --------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_no_api_key_in_manifests(path):
    text = path.read_text()
    for word in FORBIDDEN:
        assert word not in text, f"{path.name} contains {word!r}"


def test_tenants_secret_is_referenced_not_defined():
    """The tenants Secret is created by the operator (deploy/README.md): no Secret with data here."""
    for name, doc in documents():
        if doc["kind"] == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), f"{name}: a Secret with contents"
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl create secret generic vsteer-tenants" in readme
    for name, spec in pod_specs():
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert "vsteer-tenants" in secrets.values(), f"{name}: the tenants Secret is not mounted"
        volume = next(v for v, s in secrets.items() if s == "vsteer-tenants")
        (main,) = spec["containers"]
        (mount,) = [m for m in main["volumeMounts"] if m["name"] == volume]
        assert mount.get("readOnly") is True
        args = main["args"]
        assert "--tenants" in args, f"{name}: the tenants file is not passed"
        tenants = args[args.index("--tenants") + 1]
        assert Path(tenants).parent == Path(mount["mountPath"]), f"{name}: --tenants {tenants} is not in the Secret's mount"


def test_every_mounted_volume_is_defined():
    claims = {doc["metadata"]["name"] for doc in of_kind("PersistentVolumeClaim")}
    for name, spec in pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers(spec):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{container['name']}: volume {mount['name']!r} is not defined"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{name}: PVC {claim!r} is not defined under deploy/k8s/"


def test_shared_volumes_name_a_storage_class():
    for doc in of_kind("PersistentVolumeClaim"):
        if "ReadWriteMany" in doc["spec"]["accessModes"]:
            assert doc["spec"].get("storageClassName"), f"{doc['metadata']['name']}: no storageClassName"


def test_resources_requests_and_limits():
    for name, spec in pod_specs():
        for container in containers(spec):
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for key in ("cpu", "memory"):
                assert key in requests and key in limits, f"{name}/{container['name']}: {key} request and limit"
        (main,) = spec["containers"]
        res = main["resources"]
        assert res["limits"]["nvidia.com/gpu"] == 1 == res["requests"].get("nvidia.com/gpu", 1)


def test_probes_on_vllm_health():
    for name, spec in pod_specs():
        (main,) = spec["containers"]
        ports = {p.get("name"): p["containerPort"] for p in main["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in main, f"{name}: no {probe}"
            get = main[probe]["httpGet"]
            assert get["path"] == "/health", f"{name}: {probe} on {get['path']}"
            assert get["port"] in ports or get["port"] in ports.values(), f"{name}: {probe} port {get['port']}"
            assert ports.get(get["port"], get["port"]) == 8000
        # the startup probe must outlast loading the model before liveness may restart the pod
        startup = main["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_dev_shm_is_memory_backed():
    for name, spec in pod_specs():
        volumes = {v["name"]: v for v in spec["volumes"]}
        (main,) = spec["containers"]
        (mount,) = [m for m in main["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[mount["name"]].get("emptyDir", {}).get("medium") == "Memory", f"{name}: /dev/shm"


def test_serve_args():
    for name, spec in pod_specs():
        (main,) = spec["containers"]
        args = main["args"]
        assert not args[0].startswith("-"), f"{name}: MODEL must be the first argument"
        assert "--max-model-len" in args and int(args[args.index("--max-model-len") + 1]) > 0
        assert "command" not in main, f"{name}: `command` would replace the image's entry point"
        mounts = {m["mountPath"] for m in main["volumeMounts"]}
        assert "/models" in mounts and args[0].startswith("/models/")
        assert "/vectors" in mounts


def test_service_selects_the_pods():
    (service,) = of_kind("Service")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


# --- the image ----------------------------------------------------------------------------------


def dockerfile_entrypoint() -> list[str]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert len(lines) == 1
    return json.loads(lines[0].removeprefix("ENTRYPOINT"))


def test_dockerfile():
    text = DOCKERFILE.read_text()
    for word in FORBIDDEN:
        assert word not in text
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "COPY deploy ./deploy" in instructions  # serve_config.yaml, for `serve run`
    (install,) = [line for line in instructions if "pip install" in line]
    extras = install.split('".[')[1].split("]")[0].split(",")
    assert "ray" in extras and "registry" in extras, "ray[serve] or the PostgreSQL client is not installed"
    env = " ".join(instructions)
    assert "HF_HUB_OFFLINE=1" in env and "VSTEER_LOG=info" in env and "PYTHONUNBUFFERED=1" in env
    assert not any(line.startswith("CMD") for line in instructions)
    assert dockerfile_entrypoint() == ["/bin/sh", "/opt/vsteer/deploy/entrypoint.sh"]
    assert any(line.startswith("WORKDIR /opt/vsteer") for line in instructions)


def test_ray_extra_has_serve():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "ray[serve]==2.60.0" in extras["ray"]
    assert any(req.startswith("kubernetes-validate==") for req in extras["test"])


def container_argv(args: list[str], tmp_path: Path, **env: str) -> list[str]:
    """The argv the image's entry point runs for the container arguments ``args`` (after ``vsteer``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    out = tmp_path / "argv"
    stub = bin_dir / "vsteer"
    stub.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > {shlex.quote(str(out))}\n")
    stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("VSTEER_HOST", "VSTEER_PORT")}
    shell, script = dockerfile_entrypoint()
    assert script == f"/opt/vsteer/{ENTRYPOINT.relative_to(REPO)}"
    subprocess.run([shell, str(ENTRYPOINT), *args], check=True, timeout=30,
                   env={**clean, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    return out.read_bytes().decode().split("\0")[:-1]


def test_entrypoint_appends_host_and_port(tmp_path):
    assert container_argv([], tmp_path) == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert container_argv(["/m", "--max-slots", "4"], tmp_path) == [
        "serve", "/m", "--max-slots", "4", "--host", "0.0.0.0", "--port", "8000"]
    assert container_argv(["/m", "--port=9000"], tmp_path) == ["serve", "/m", "--port=9000", "--host", "0.0.0.0"]
    assert container_argv(["/m", "--host", "::", "--port", "1"], tmp_path) == ["serve", "/m", "--host", "::", "--port", "1"]


def vllm_argv(argv: list[str], monkeypatch) -> list[str]:
    """The stock vLLM server arguments the real ``vsteer serve`` gives for ``argv``
    (``["serve", ...]``), from its ``--print-command``, checked by vLLM's own parser."""
    from click.testing import CliRunner

    from vsteer.cli.serve import serve
    from vsteer.server.ray_app import _parse

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert argv[0] == "serve"
    done = CliRunner().invoke(serve, [*argv[1:], "--print-command"], prog_name="vsteer serve")
    assert done.exit_code == 0, done.output
    words = shlex.split(done.stdout.strip().splitlines()[-1])
    assert words[0].startswith("VLLM_PLUGINS=") and "vsteer" in words[0] and words[2:4] == ["-m", STOCK_ENTRY]
    parsed = _parse(words[4:])  # vLLM's parser: no stray positional, every option known
    assert parsed.model_tag is None
    return words[4:]


def served_model(vllm_args: list[str]) -> str:
    assert vllm_args.count("--model") == 1
    return vllm_args[vllm_args.index("--model") + 1]


def test_container_serves_the_deployments_model(tmp_path, monkeypatch):
    """The Deployment's args, through the image's entry point and `vsteer serve`'s parsing: vLLM
    gets the Deployment's model (not the default SmolLM2) and listens on 0.0.0.0:8000."""
    (main,) = deployment()["spec"]["template"]["spec"]["containers"]
    model = tmp_path / "models" / Path(main["args"][0]).name
    model.mkdir(parents=True)
    tenants = tmp_path / "tenants.json"
    tenants.write_text('{"tenants": {}}')
    local = {main["args"][0]: str(model), "/etc/vsteer/tenants.json": str(tenants)}
    args = [local.get(arg, arg) for arg in main["args"]]

    out = vllm_argv(container_argv(args, tmp_path), monkeypatch)
    assert served_model(out) == str(model)
    assert out.count(str(model)) == 1, f"the model is also passed as a stray positional: {out}"
    assert out[out.index("--host") + 1] == "0.0.0.0" and out[out.index("--port") + 1] == "8000"
    assert out[out.index("--max-model-len") + 1] == main["args"][main["args"].index("--max-model-len") + 1]
    settings = json.loads(out[out.index("--additional-config") + 1])["vsteer"]
    assert settings["max_slots"] == 128 and settings["tenants"] == str(tenants)


def test_dockerfiles_example_serves_its_model(tmp_path, monkeypatch):
    """The `docker run` example in the Dockerfile's header."""
    text = DOCKERFILE.read_text().replace("\\\n#", "")
    (line,) = [line for line in text.splitlines() if line.startswith("#") and "docker run" in line]
    words = shlex.split(line.lstrip("#"))
    args = words[words.index("vsteer:0.1.0") + 1:]
    model = tmp_path / Path(args[0]).name
    model.mkdir()
    args[0] = str(model)
    out = vllm_argv(container_argv(args, tmp_path), monkeypatch)
    assert served_model(out) == str(model) and out.count(str(model)) == 1


def test_model_after_options_is_the_model_served(tmp_path, monkeypatch):
    """The old entry point's order (options before MODEL) served the default SmolLM2; MODEL is now
    found wherever it stands among vLLM's options, as `vllm serve` finds it."""
    model = tmp_path / "X"
    model.mkdir()
    out = vllm_argv(["serve", "--host", "0.0.0.0", "--port", "8000", str(model), "--max-slots", "4"], monkeypatch)
    assert served_model(out) == str(model) and out.count(str(model)) == 1
    assert json.loads(out[out.index("--additional-config") + 1])["vsteer"]["max_slots"] == 4


# --- the KubeRay RayService -------------------------------------------------------------------

RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"


def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def ray_pod_templates() -> list[tuple[str, dict]]:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]) for name, group in groups]


@pytest.mark.parametrize("group", [name for name, _ in ray_pod_templates()])
def test_rayservice_pods_match_the_kubernetes_schema(group):
    """KubeRay's CRD is not in the bundled schemas: each group's pod template is checked as a Pod."""
    template = dict(ray_pod_templates())[group]
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"vsteer-{group}"}, "spec": template["spec"]})
    spec = template["spec"]
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for container in spec["containers"]:
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert "livenessProbe" in container and "readinessProbe" in container
        secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e}
        assert secrets == {"vsteer-tenants", "vsteer-registry"}  # referenced, never defined here
    assert rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_rayservice_workers_have_a_gpu_shm_and_a_startup_probe():
    (worker,) = [t for name, t in ray_pod_templates() if name != "head"]
    (container,) = worker["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and "startupProbe" in container
    shm = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"}
    assert [v["emptyDir"]["medium"] for v in worker["spec"]["volumes"] if v["name"] in shm] == ["Memory"]


def test_rayservice_embeds_the_serve_config_ray_accepts():
    """Ray Serve's own schema accepts the embedded config, whose application is serve_config.yaml's
    with the GPU model and sizes, and whose args are valid replica arguments."""
    from ray.serve.schema import ServeDeploySchema

    from vsteer.server.ray_app import ReplicaArgs

    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    local = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    for config in (embedded, local):
        ServeDeploySchema.model_validate(config)
        (app,) = config["applications"]
        ReplicaArgs.model_validate(app["args"])
        assert "working_dir" not in app.get("runtime_env", {})  # the installed package, never a shadowing folder
        for word in FORBIDDEN:
            assert word not in json.dumps(config)
    (gpu,), (cpu,) = embedded["applications"], local["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert gpu[key] == cpu[key]
    assert [d["name"] for d in gpu["deployments"]] == [d["name"] for d in cpu["deployments"]]
    assert gpu["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
    assert "--max-model-len" in gpu["args"]["vllm_args"] and "--max-model-len" in cpu["args"]["vllm_args"]
