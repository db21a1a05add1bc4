"""deploy/: what can be checked without a container runtime or a cluster (none is reachable
here). The manifests pass Kubernetes' own schemas (``kubernetes-validate --strict``) and the
Dockerfile passes ``hadolint``; every entry point, parameter and option they name exists;
the image runs ``mlflow run . --env-manager local``. That the multi-node commands really
train, and survive a lost pod, is shown by tests/test_distributed.py, which runs the
manifest's own script."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

from helpers.processes import VENV_BIN

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENTRY_POINTS = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def manifests() -> dict[str, list[dict]]:
    return {path.name: list(yaml.safe_load_all(path.read_text()))
            for path in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def container_commands() -> list[list[str]]:
    """Every command a container runs, as words; a ``sh -c`` script gives one per line.
    The image's entry point is put in front of bare ``args``."""
    commands = []
    for docs in manifests().values():
        for doc in docs:
            if doc["kind"] != "Job":
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container.get("command") == ["/bin/sh", "-c"]:
                    for line in container["args"][0].splitlines():
                        words = shlex.split(line.strip().removeprefix("exec "))
                        if words and words[0] in ("mlflow", "python"):
                            commands.append(words)
                else:
                    commands.append([*image_entrypoint(), *container["args"]])
    return commands


def image_entrypoint() -> list[str]:
    line = next(x for x in (DEPLOY / "Dockerfile").read_text().splitlines()
                if x.startswith("ENTRYPOINT"))
    return yaml.safe_load(line.removeprefix("ENTRYPOINT"))


def click_options(entry_point: str) -> set[str]:
    return set(re.findall(r"(--[a-z-]+) \{", ENTRY_POINTS[entry_point]["command"]))


def test_every_manifest_parses_and_names_real_kinds():
    found = manifests()
    assert set(found) == {"pipeline-job.yaml", "train-multinode.yaml"}
    for docs in found.values():
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] in ("Job", "ConfigMap", "Service")


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([f"{VENV_BIN}/kubernetes-validate", "--strict", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_every_manifest_passes_the_kubernetes_schemas_strictly(tmp_path):
    paths = sorted((DEPLOY / "k8s").glob("*.yaml"))
    result = kubernetes_validate(*paths)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == sum(
        len(docs) for docs in manifests().values())
    # The validator can fail: a field Kubernetes does not know is refused under --strict.
    job = next(d for d in manifests()["pipeline-job.yaml"] if d["kind"] == "Job")
    job["spec"]["backofLimit"] = 0
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(job))
    assert kubernetes_validate(tmp_path / "typo.yaml").returncode != 0


def test_the_dockerfile_passes_hadolint():
    result = subprocess.run([f"{VENV_BIN}/hadolint", str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_mlflow_run_with_the_local_env_manager():
    assert image_entrypoint() == ["mlflow", "run", ".", "--env-manager", "local"]
    text = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / source).exists(), source
    assert re.search(r"^ARG TORCH=cpu$", text, flags=re.M)  # the CPU/CUDA switch


def test_every_entry_point_parameter_and_option_named_exists():
    commands = container_commands()
    assert len(commands) == 3  # the pipeline, pod 0 of train, the other pods
    for words in commands:
        if words[0] == "mlflow":
            entry = words[words.index("-e") + 1] if "-e" in words else "main"
            params = [words[i + 1].split("=")[0] for i, w in enumerate(words) if w == "-P"]
            assert params, words
            assert set(params) <= set(ENTRY_POINTS[entry]["parameters"]), (entry, params)
        else:
            assert words[:3] == ["python", "-m", "steps.train"]
            options = {w for w in words if w.startswith("--")}
            assert options <= click_options("train"), options


def test_the_tracking_uri_comes_from_a_secret():
    for docs in manifests().values():
        for doc in docs:
            if doc["kind"] != "Job":
                continue
            env = {e["name"]: e for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["key"] == "uri"
