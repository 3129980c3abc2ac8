"""The deploy recipes in deploy/, each checked by its own tool: the systemd units by
`systemd-analyze verify`, the Containerfile by hadolint, the Kubernetes manifests by
kubernetes-validate (strict), the Prometheus rules by `promtool test rules`. Each check is paired
with a broken copy the tool must reject (so a silent tool cannot pass), and the values the
recipes share with dualproxy (its config, its ports, its timeouts) are checked against it.

The tools are installed by scripts/test (DUALPROXY_REQUIRE_DEPLOY_TOOLS=1 there: missing, they
fail the test instead of skipping it)."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from dualproxy.config.loader import parse
from dualproxy.config.names import ListenAddress

ROOT: Final = Path(__file__).resolve().parent.parent
DEPLOY: Final = ROOT / "deploy"
SYSTEMD: Final = DEPLOY / "systemd"
CONTAINERFILE: Final = DEPLOY / "container" / "Containerfile"
KUBERNETES: Final = DEPLOY / "kubernetes" / "dualproxy.yaml"
PROMETHEUS: Final = DEPLOY / "prometheus"
TOOL_TIMEOUT: Final = 120.0
# Where the units expect the dualproxy command (a venv in /opt/dualproxy).
UNIT_COMMAND: Final = "/opt/dualproxy/bin/dualproxy"


def tool(name: str) -> str:
    """The path of a checker: on PATH, in this virtual environment's bin, or in its tools
    folder (promtool, unpacked there by scripts/test); skipped (or failed, when scripts/test
    requires the tools) when missing."""
    bin_dir = Path(sys.executable).parent
    for candidate in (shutil.which(name), bin_dir / name, bin_dir.parent / "tools" / name):
        if candidate is not None and os.access(candidate, os.X_OK):
            return str(candidate)
    if os.environ.get("DUALPROXY_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(f"{name} is required (DUALPROXY_REQUIRE_DEPLOY_TOOLS=1) but not found")
    pytest.skip(f"{name} not found (scripts/test installs it)")


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False, cwd=cwd
    )


# --- systemd -----------------------------------------------------------------------------------


def units_in(folder: Path, *, edit: tuple[str, str] | None = None) -> list[Path]:
    """The units copied to `folder`, the command pointed at this checkout's (verify checks that
    ExecStart's binary exists); `edit` replaces one text in the service."""
    command = shutil.which("dualproxy", path=str(Path(sys.executable).parent))
    assert command is not None
    copies = []
    for unit in sorted(SYSTEMD.iterdir()):
        text = unit.read_text().replace(UNIT_COMMAND, command)
        if edit is not None and unit.suffix == ".service":
            assert edit[0] in text
            text = text.replace(*edit)
        copy = folder / unit.name
        copy.write_text(text)
        copies.append(copy)
    return copies


def test_the_systemd_units_verify_cleanly(tmp_path: Path) -> None:
    result = run(tool("systemd-analyze"), "verify", *map(str, units_in(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # not even a warning


def test_a_broken_unit_is_reported(tmp_path: Path) -> None:
    """The negative twin: a misspelled hardening setting (which systemd would ignore) is named."""
    units = units_in(tmp_path, edit=("ProtectSystem=strict", "ProtectSytem=strict"))
    result = run(tool("systemd-analyze"), "verify", *map(str, units))
    assert "Unknown key 'ProtectSytem'" in result.stderr


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_the_service_runs_unprivileged_and_drains_within_its_stop_timeout() -> None:
    service = unit(SYSTEMD / "dualproxy.service")["Service"]
    assert service["User"] == "dualproxy"
    assert service["CapabilityBoundingSet"] == ""  # port 443 is systemd's (the socket unit)
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/dualproxy"
    assert service["ExecStart"].startswith(f"{UNIT_COMMAND} serve -c /etc/dualproxy/config.toml")
    # SIGKILL only after the default drain (shutdown_grace 30 s) and a margin.
    assert float(service["TimeoutStopSec"]) > 30
    socket_unit = unit(SYSTEMD / "dualproxy.socket")["Socket"]
    # One socket per family: an IPv4 client must not appear as ::ffff:a.b.c.d to the hints.
    assert socket_unit["BindIPv6Only"] == "ipv6-only"
    assert unit(SYSTEMD / "dualproxy-acme-http.socket")["Socket"]["FileDescriptorName"] == (
        "acme-http"
    )


# --- the Containerfile -------------------------------------------------------------------------


def test_the_containerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), str(CONTAINERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_containerfile_fails_hadolint(tmp_path: Path) -> None:
    """The negative twin: an unpinned base image and root as the last user."""
    broken = tmp_path / "Containerfile"
    text = CONTAINERFILE.read_text().replace("USER 10001:10001", "USER root")
    broken.write_text(re.sub(r"python:3\.11-slim-bookworm", "python", text))
    result = run(tool("hadolint"), str(broken))
    assert result.returncode != 0
    assert "DL3002" in result.stdout  # last USER should not be root
    assert "DL3006" in result.stdout  # always tag the version of an image explicitly


def test_the_image_runs_unprivileged_with_the_state_dir_as_a_volume() -> None:
    text = CONTAINERFILE.read_text()
    lines = text.splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users == ["10001:10001"]
    assert 'VOLUME ["/var/lib/dualproxy"]' in lines
    healthcheck = text[text.index("\nHEALTHCHECK") :].split("\n\n", 1)[0]
    assert "http://127.0.0.1:9901/healthz" in healthcheck


# --- Kubernetes ----------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """The manifests by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERNETES.read_text())}


def test_the_kubernetes_manifests_validate_strictly() -> None:
    result = run(tool("kubernetes-validate"), "--strict", str(KUBERNETES))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource (\S+)", result.stdout + result.stderr)
    assert sorted(kind.split("/")[0] for kind in passed) == [
        "configmap",
        "deployment",
        "persistentvolumeclaim",
        "poddisruptionbudget",
        "service",
    ]


def test_a_broken_manifest_fails_validation(tmp_path: Path) -> None:
    """The negative twin: a misspelled field, which the API server would drop silently."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(KUBERNETES.read_text().replace("readinessProbe:", "readynessProbe:"))
    result = run(tool("kubernetes-validate"), "--strict", str(broken))
    assert result.returncode != 0
    assert "readynessProbe" in result.stdout + result.stderr


def test_the_deployment_agrees_with_its_dualproxy_config(tmp_path: Path) -> None:
    """The ConfigMap's config.toml is a valid dualproxy config, and the Deployment probes its
    admin listener, drains within its grace, and keeps the keys private."""
    docs = manifests()
    text = docs["ConfigMap"]["data"]["config.toml"]
    config = parse(tomllib.loads(text), base_dir=tmp_path, check_files=False)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert config.listen.addresses == (ListenAddress("0.0.0.0", ports["https"]),)
    assert config.admin.address == ListenAddress("0.0.0.0", ports["admin"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    # The drain delay outlasts the readiness probe's way out of the endpoints...
    probe = container["readinessProbe"]
    assert config.lifecycle.drain_delay >= probe["periodSeconds"] * probe["failureThreshold"]
    # ... and SIGKILL comes only after the delay and the drain.
    grace = config.lifecycle.drain_delay + config.limits.shutdown_grace
    assert pod["terminationGracePeriodSeconds"] > grace
    assert "lifecycle" not in container  # no preStop hook: the drain delay does it
    keys = next(v for v in pod["volumes"] if v["name"] == "keys")
    # 0400 as written; the kubelet adds group read for the pod's fsGroup (0440 root:group),
    # which dualproxy's key check accepts for a root-owned key.
    assert keys["secret"]["defaultMode"] == 0o400
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert docs["Service"]["spec"]["externalTrafficPolicy"] == "Local"
    # The replicas' shared state folder is the ReadWriteMany volume every pod mounts.
    state = next(m for m in container["volumeMounts"] if m["name"] == "state")
    assert config.state.dir == Path(state["mountPath"])
    assert config.state.configured
    claim = next(v for v in pod["volumes"] if v["name"] == "state")["persistentVolumeClaim"]
    assert claim["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


# --- Prometheus ----------------------------------------------------------------------------------


def test_the_prometheus_rules_pass_their_unit_tests() -> None:
    promtool = tool("promtool")
    check = run(promtool, "check", "rules", "dualproxy.rules.yml", cwd=PROMETHEUS)
    assert check.returncode == 0, check.stdout + check.stderr
    result = run(promtool, "test", "rules", "dualproxy.rules.test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_rule_that_alerts_on_the_wrong_margin_fails_its_tests(tmp_path: Path) -> None:
    """The negative twin: the same tests against rules whose margin is 0.5 (the broken app
    version's 30% would go unnoticed) fail."""
    rules = (PROMETHEUS / "dualproxy.rules.yml").read_text()
    assert rules.count(") > 0.05") == 1
    (tmp_path / "dualproxy.rules.yml").write_text(rules.replace(") > 0.05", ") > 0.5"))
    shutil.copy(PROMETHEUS / "dualproxy.rules.test.yml", tmp_path)
    result = run(tool("promtool"), "test", "rules", "dualproxy.rules.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "DualproxyNewKeyPinFailures" in result.stdout + result.stderr


def test_the_rules_use_only_metrics_dualproxy_exports() -> None:
    """Every dualproxy_* series the rules read is one that /metrics writes (README's table)."""
    text = (PROMETHEUS / "dualproxy.rules.yml").read_text()
    rules = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # Recorded series (key:dualproxy_...:rate10m) are the rules' own.
    used = set(re.findall(r"(?<![:\w])dualproxy_[a-z_]+(?![:\w])", rules))
    readme = (ROOT / "README.md").read_text()
    exported = set(re.findall(r"`(dualproxy_[a-z_]+)`", readme))
    assert used, rules
    assert used <= exported, used - exported
