"""deploy/: what can be checked without a container engine or a cluster.

- the compose file against the Compose Specification's JSON schema (check-jsonschema ships
  it), its variables against .env.example, and the service's environment against Settings;
- the Kubernetes manifests against the API schemas of a Kubernetes release
  (kubernetes-validate), and their wiring (probes, GPU, grace period, affinity, TURN secret);
- the image's install path: the Dockerfile's COPY set is rebuilt in a temp dir and its
  install step (deploy/install.sh, CPU variant) runs there for real (in CI; set
  OMNI_TEST_INSTALL=1 to run it locally: about 3 minutes and 1.5 GB).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from omni.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.31.0"
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}
_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?+])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, enough for our file."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return env[name] if present else arg
        if op in (":?", "?"):
            if not present:
                raise KeyError(f"{name}: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if present else ""
        return env.get(name, "")

    return _VARIABLE.sub(value, text).replace("$$", "$")


# OMNI_* variables that are not settings of `omni serve` but of the whole installation
INSTALLATION_ENV = {"OMNI_CACHE"}  # where omni keeps what it makes (the tiny checkpoint)


def omni_settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the service would read them from this environment; unknown OMNI_* names
    fail (Settings itself ignores them, so a typo would silently keep a default)."""
    for name in list(os.environ):
        if name.startswith("OMNI_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("OMNI_") and name not in INSTALLATION_ENV:
            assert name.removeprefix("OMNI_").lower() in Settings.model_fields, name
            monkeypatch.setenv(name, str(value))
    return Settings()


def dockerfile_env() -> dict[str, str]:
    """The image's ENV (KEY=VALUE pairs, continued lines joined)."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
    return env


# -- compose


def test_compose_file_follows_the_compose_spec() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {m.group(1) for m in _VARIABLE.finditer(text)} <= set(example), (
        "every variable the compose file uses is explained in .env.example"
    )
    with pytest.raises(KeyError, match="OMNI_API_KEYS"):  # a missing secret stops `up`
        interpolate(text, {k: v for k, v in example.items() if k != "OMNI_API_KEYS"})
    services = yaml.safe_load(interpolate(text, example))["services"]

    for name in ("omni", "omni-cpu"):
        service = services[name]
        settings = omni_settings_from_env(
            {**dockerfile_env(), **service["environment"]}, monkeypatch
        )
        assert settings.auth_enabled and settings.host == "0.0.0.0"
        assert settings.turn_urls and settings.turn_secret is not None
        assert settings.client_secret_key is not None  # client secrets survive a restart
        # /metrics: its own port, on the private network only (nothing published, not proxied)
        assert settings.metrics_host == "0.0.0.0" and settings.metrics_port != settings.port
        assert "ports" not in service
        assert service["volumes"] == ["models:/models"]
        grace = int(service["stop_grace_period"].removesuffix("s"))
        assert grace > settings.drain_grace_seconds + 15, "docker must not kill a draining call"
    gpu = services["omni"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["omni"]["build"]["args"]["OMNI_TORCH"] == "cuda"
    assert services["omni-cpu"]["build"]["args"]["OMNI_TORCH"] == "cpu"

    # coturn: TURN REST auth with the service's secret, relaying only to the service
    turn = services["turn"]["command"]
    assert "--use-auth-secret" in turn
    assert f"--static-auth-secret={example['OMNI_TURN_SECRET']}" in turn
    omni_ip = services["omni"]["networks"]["calls"]["ipv4_address"]
    assert f"--allowed-peer-ip={omni_ip}" in turn
    assert "--denied-peer-ip=172.16.0.0-172.31.255.255" in turn
    assert "--no-tcp-relay" in turn  # a TCP relay could reach the service's /metrics port
    caddy = services["https"]["command"]
    assert f"--to {omni_ip}:{settings.port}" in caddy and str(settings.metrics_port) not in caddy


# -- Kubernetes


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def find(kind: str, name: str) -> dict[str, Any]:
    return next(
        d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name
    )


def test_manifests_follow_the_kubernetes_api_schemas() -> None:
    documents = k8s_documents()
    assert {d["kind"] for _, d in documents} >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "Ingress",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
        "Job",
    }
    for filename, document in documents:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{filename}: {document['kind']} {document['metadata']['name']}: {error}")


def test_kubernetes_wiring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = find("Deployment", "omni")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # secrets: a stand-in as long as the real ones must be
    env = {e["name"]: e.get("value", "x" * 32) for e in container["env"]}

    # the ConfigMap's TOML is a valid config file for this version of the service
    config = tmp_path / "omni.toml"
    config.write_text(find("ConfigMap", "omni-config")["data"]["omni.toml"])
    # the pod runs with the image's ENV under its own
    settings = omni_settings_from_env(
        {**dockerfile_env(), **env, "OMNI_CONFIG": str(config)}, monkeypatch
    )
    assert env["OMNI_CONFIG"] == "/etc/omni/omni.toml"
    assert {"mountPath": "/etc/omni", "name": "config", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert settings.host == "0.0.0.0" and settings.log_format == "json"

    assert container["ports"] == [
        {"name": "http", "containerPort": settings.port},
        {"name": "metrics", "containerPort": settings.metrics_port},
    ]
    assert settings.metrics_host == "0.0.0.0"  # the scraper reaches the pod's address
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"  # not killed while loading
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # one replica per GPU
    assert pod["terminationGracePeriodSeconds"] > settings.drain_grace_seconds + 15
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert secrets == {"api-keys", "turn-secret", "client-secret-key"}

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find("Service", "omni")
    assert service["spec"]["selector"] == labels
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    ingress = find("Ingress", "omni")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    # the Ingress reaches the API port only; /metrics has a headless Service of its own
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends == [{"name": "omni", "port": {"name": "http"}}]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    metrics = find("Service", "omni-metrics")["spec"]
    assert metrics["clusterIP"] == "None" and metrics["selector"] == labels
    assert [p["targetPort"] for p in metrics["ports"]] == ["metrics"]

    coturn = find("Deployment", "coturn")["spec"]["template"]["spec"]
    args = coturn["containers"][0]["args"]
    assert coturn["hostNetwork"] is True
    assert "--use-auth-secret" in args and "--static-auth-secret=$(TURN_SECRET)" in args
    assert "--no-tcp-relay" in args
    turn_secret = next(e for e in coturn["containers"][0]["env"] if e["name"] == "TURN_SECRET")
    assert turn_secret["valueFrom"]["secretKeyRef"] == {
        "name": "omni-secrets",
        "key": "turn-secret",
    }

    readme = (DEPLOY / "README.md").read_text()
    assert "create secret generic omni-secrets" in readme  # how the secret is made


# -- the image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    return [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in lines]


def test_dockerfile_runs_the_install_script_as_a_non_root_service() -> None:
    instructions = dockerfile_instructions()
    runs = [args for op, args in instructions if op == "RUN"]
    assert any("sh /src/deploy/install.sh /opt/omni /src" in run for run in runs)
    assert ("ARG", "OMNI_TORCH=cuda") in instructions
    assert ("USER", "omni") in instructions
    assert ("ENTRYPOINT", '["omni"]') in instructions
    healthcheck = next(args for op, args in instructions if op == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert ("VOLUME", "/models") in instructions
    env = dockerfile_env()
    assert env["HF_HOME"].startswith("/models/") and env["OMNI_CACHE"].startswith("/models/")
    for name in env.keys() - INSTALLATION_ENV:
        if name.startswith("OMNI_"):
            assert name.removeprefix("OMNI_").lower() in Settings.model_fields, name
    # what the image copies is let through by its .dockerignore
    allowed = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for source in copied_sources():
        assert f"!{source}" in allowed or f"!{source}/" in allowed, source


def copied_sources() -> list[str]:
    sources = []
    for op, args in dockerfile_instructions():
        if op == "COPY":
            *srcs, _ = args.split()
            sources += srcs
    return sources


@pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("OMNI_TEST_INSTALL")),
    reason="installs torch and every dependency into a new venv (~3 min): CI, or OMNI_TEST_INSTALL=1",
)
def test_install_script_builds_the_cpu_image_environment(tmp_path: Path) -> None:
    # the image's build context, as its COPY lines lay it out under /src
    src = tmp_path / "src"
    for op, args in dockerfile_instructions():
        if op == "COPY":
            *sources, dest = args.split()
            target = src / dest.removeprefix("/src").lstrip("/")
            for source in sources:
                path = ROOT / source
                into = target / path.name if dest.endswith("/") else target
                if path.is_dir():
                    shutil.copytree(path, into, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, into)
    venv = tmp_path / "opt" / "omni"
    # TORCH_CPU_INDEX empty: pip's own configuration here serves the CPU build of torch (the
    # image adds the PyTorch CPU index, which this machine cannot reach)
    env = {**os.environ, "OMNI_TORCH": "cpu", "TORCH_CPU_INDEX": ""}
    run = subprocess.run(
        ["sh", str(src / "deploy" / "install.sh"), str(venv), str(src)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    torch_version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "+cpu" in torch_version
    help_text = subprocess.run(
        [str(venv / "bin" / "omni"), "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--turn-secret" in help_text and "OMNI_DRAIN_GRACE_SECONDS" in help_text
