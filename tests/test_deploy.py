"""deploy/: what can be checked without a container runtime or a cluster (none is reachable
here). The manifests pass Kubernetes' own schemas (``kubernetes-validate --strict``), the
Dockerfile passes ``hadolint``, and checkov finds no failed check in either (its skips are
the ones docs/deploy.md lists); every entry point, parameter and option they name exists;
every pod meets the "restricted" Pod Security Standard its namespace enforces; the image
runs ``mlflow run . --env-manager local`` as the manifests' high UID.

The manifests' own commands run here as their pods would, under the same constraints as
far as one machine shows them (tests/helpers/pods.py: a read-only tree but the declared
volumes, a non-root UID without privileges, the login as a mounted file): the pipeline Job
against a basic-auth tracking server, the serving Deployment on the champion it registered
(and refusing that champion edited), the two multi-node pods. That the multi-node commands
survive a lost pod is shown by tests/test_distributed.py, which runs the same script."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import pods
from helpers.processes import VENV_BIN, free_port, wait_for_http
from helpers.store import basic_auth_server

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENTRY_POINTS = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def manifests() -> dict[str, list[dict]]:
    return {path.name: list(yaml.safe_load_all(path.read_text()))
            for path in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def pod_templates() -> dict[str, dict]:
    """Every pod template (Jobs and the Deployment), by ``file:Kind/name``."""
    return {f"{name}:{doc['kind']}/{doc['metadata']['name']}": doc["spec"]["template"]["spec"]
            for name, docs in manifests().items() for doc in docs
            if doc["kind"] in ("Job", "Deployment")}


def container_commands() -> list[list[str]]:
    """Every command a Job's container runs, as words; a ``sh -c`` script gives one per
    line. The image's entry point is put in front of bare ``args``."""
    commands = []
    for docs in manifests().values():
        for doc in docs:
            if doc["kind"] != "Job":
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container.get("command") == ["/bin/sh", "-c"]:
                    commands += script_commands(container["args"][0])
                else:
                    commands.append([*image_entrypoint(), *container["args"]])
    return commands


def script_commands(script: str) -> list[list[str]]:
    words = [shlex.split(line.strip().removeprefix("exec ")) for line in script.splitlines()]
    return [w for w in words if w and w[0] in ("mlflow", "python", "mnist-pipeline-preflight")]


def image_entrypoint() -> list[str]:
    line = next(x for x in (DEPLOY / "Dockerfile").read_text().splitlines()
                if x.startswith("ENTRYPOINT"))
    return yaml.safe_load(line.removeprefix("ENTRYPOINT"))


def click_options(entry_point: str) -> set[str]:
    return set(re.findall(r"(--[a-z-]+) \{", ENTRY_POINTS[entry_point]["command"]))


def test_every_manifest_parses_and_names_real_kinds():
    found = manifests()
    assert set(found) == {"namespace.yaml", "pipeline-job.yaml", "serve.yaml",
                          "train-multinode.yaml"}
    for docs in found.values():
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] in (
                "Namespace", "Job", "ConfigMap", "Service", "Deployment", "NetworkPolicy")


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


def image_user() -> int:
    users = re.findall(r"^USER (\S+)$", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    return int(users[-1])


def test_the_image_runs_mlflow_run_with_the_local_env_manager_as_a_high_uid():
    assert image_entrypoint() == ["mlflow", "run", ".", "--env-manager", "local"]
    text = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / source).exists(), source
    assert re.search(r"^ARG TORCH=cpu$", text, flags=re.M)  # the CPU/CUDA switch
    # A base of a fixed tag, named in the FROM line itself (no ARG, no "latest").
    (base,) = re.findall(r"^FROM (\S+)$", text, flags=re.M)
    name, _, tag = base.partition(":")
    assert name == "python" and re.fullmatch(r"3\.11\.\d+-slim-\w+", tag), base
    assert image_user() >= 10000
    assert f"--uid {image_user()}" in text  # the user it creates is the one it runs as


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


def serving() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in manifests()["serve.yaml"]}


def test_the_serving_pod_checks_the_registered_digest_then_serves_on_its_probed_port():
    from mlflow.models.cli import commands as models_cli

    docs = serving()
    pod = docs["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    script = container["args"][0]
    assert script.splitlines()[0] == "set -e"  # a refused model stops the pod
    check, serve = script_commands(script)
    assert check == ["mnist-pipeline-preflight", "--model", "$MODEL_URI"]
    assert serve[:3] == ["mlflow", "models", "serve"]
    assert serve[serve.index("-m") + 1] == "$MODEL_URI"
    assert serve[serve.index("--env-manager") + 1] == "local"
    options = {o for p in models_cli.commands["serve"].params for o in p.opts}
    assert {w for w in serve if w.startswith("-")} <= options
    env = {e["name"]: e for e in container["env"]}
    assert env["MODEL_URI"]["value"] == "models:/mnist-classifier@champion"
    # The probes ask the scoring server's health endpoints on the port it listens on, and
    # the Service and the NetworkPolicy lead to that port.
    (port,) = container["ports"]
    assert port["containerPort"] == int(serve[serve.index("--port") + 1])
    paths = set()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"], probe
        paths.add(container[probe]["httpGet"]["path"])
    assert paths == {"/ping", "/health"}
    labels = pod["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"] == labels
    assert docs["Service"]["spec"]["selector"] == labels
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == labels
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP",
                                             "port": port["containerPort"]}]}]


def test_every_pod_meets_the_restricted_pod_security_standard():
    (namespace,) = manifests()["namespace.yaml"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for docs in manifests().values():
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], doc
    templates = pod_templates()
    assert len(templates) == 3
    for where, spec in templates.items():
        assert spec["automountServiceAccountToken"] is False, where
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["runAsUser"] == security["runAsGroup"] == image_user(), where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), where
        for volume in spec["volumes"]:  # the restricted standard's volume types only
            assert set(volume) - {"name"} <= {"emptyDir", "secret", "configMap"}, where
        (container,) = spec["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}, where
        # Limits on both, requests equal to them (Guaranteed QoS).
        resources = container["resources"]
        assert set(resources["limits"]) == {"cpu", "memory"}, where
        assert resources["requests"] == resources["limits"], where
        # A fixed tag, pulled again in case it was pushed again.
        name, _, tag = container["image"].partition(":")
        assert name == "mnist-pipeline" and tag not in ("", "latest"), where
        assert container["imagePullPolicy"] == "Always", where
        # Every folder the environment names for writing is a declared volume.
        env = {e["name"]: e.get("value") for e in container["env"]}
        writable = {m["mountPath"] for m in container["volumeMounts"]
                    if not m.get("readOnly")}
        assert {env["HOME"], env["TMPDIR"]} <= writable, where


def test_the_tracking_uri_comes_from_a_configmap_and_the_login_from_a_mounted_file():
    for where, spec in pod_templates().items():
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"] == {
            "name": "mlflow-tracking", "key": "uri"}, where
        # No secret in the environment at all.
        assert not [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
        assert not [e for e in container.get("envFrom", []) if "secretRef" in e]
        # The Secret's `credentials` is mounted as MLflow's credentials file.
        volumes = {v["name"]: v for v in spec["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
        secret = volumes[mount["name"]]["secret"]
        assert mount["readOnly"] is True and secret["optional"] is True, where
        assert secret["items"] == [{"key": "credentials", "path": "credentials"}], where
        assert mount["mountPath"] == env["HOME"]["value"] + "/.mlflow", where


def login_mount_in_home() -> Path:
    """Where, under $HOME, the manifests mount the login (.mlflow/credentials)."""
    spec = pod_templates()["pipeline-job.yaml:Job/mnist-pipeline"]
    (container,) = spec["containers"]
    home = next(e["value"] for e in container["env"] if e["name"] == "HOME")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "login")
    return Path(mount["mountPath"]).relative_to(home) / "credentials"


def test_the_mounted_credentials_file_is_the_login_the_start_up_check_sends(
        tmp_path, monkeypatch):
    """MLflow reads ~/.mlflow/credentials when no login is in the environment; the
    project's start-up check (the preflight and every step's) must send that same login,
    or the pod would stop at it, refused, before MLflow is asked."""
    from steps.tracking.runtime import store
    from steps.tracking.runtime.cli import StepError

    seen = []

    class Login(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            ok = seen[-1] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Login)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    try:
        with pytest.raises(StepError, match="refused the login"):
            store.check_tracking_server(url)
        credentials = tmp_path / login_mount_in_home()
        credentials.parent.mkdir(parents=True)
        credentials.write_text("[mlflow]\nmlflow_tracking_username = alice\n"
                               "mlflow_tracking_password = s3cret\n")
        store.check_tracking_server(url)
        assert seen[0] is None and seen[-1].startswith("Basic ")
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- checkov


def pinned(package: str, requirements: str) -> str:
    text = (ROOT / requirements).read_text()
    return re.search(rf"^{package}==(\S+)$", text, flags=re.M).group(1)


@pytest.fixture(scope="module")
def checkov_bin() -> str:
    """The pinned checkov, in the virtualenv of its own ``make checkov-env`` keeps."""
    built = subprocess.run(["make", "-s", "-C", str(ROOT), "checkov-env"],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return str(ROOT / ".venv-checkov" / "bin" / "checkov")


def checkov(checkov_bin: str, folder: Path) -> dict[str, dict]:
    """checkov on ``folder`` (offline: nothing downloaded), its results by framework."""
    result = subprocess.run(
        [checkov_bin, "--directory", str(folder), "--framework", "kubernetes", "dockerfile",
         "--output", "json", "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=300, cwd=folder)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    found = {r["check_type"]: r for r in reports}
    failed = sum(r["summary"]["failed"] for r in found.values())
    assert (result.returncode != 0) == (failed > 0), result.stderr[-3000:]
    return found


def documented_skips() -> set[tuple[str, str]]:
    """The skips docs/deploy.md lists: (check, file), from its table of skips."""
    rows = set()
    inside = False
    for line in (ROOT / "docs" / "deploy.md").read_text().splitlines():
        if line.startswith("| skipped check | file |"):
            inside = True
        elif inside and line.startswith("| ---"):
            continue
        elif inside and line.startswith("|"):
            check, files = line.strip("|").split("|")[:2]
            for name in re.findall(r"`([^`]+)`", files):
                rows.add((re.search(r"CKV\w+", check).group(0), name))
        else:
            inside = False
    return rows


def test_checkov_finds_no_failed_check_and_only_the_documented_skips(checkov_bin):
    version = subprocess.run([checkov_bin, "--version"], capture_output=True, text=True,
                             timeout=120)
    assert version.stdout.strip() == pinned("checkov", "requirements-checkov.txt")
    found = checkov(checkov_bin, DEPLOY)
    assert set(found) == {"kubernetes", "dockerfile"}
    resources = sum(len(docs) for docs in manifests().values()) - 1  # a Namespace has none
    assert found["kubernetes"]["summary"]["resource_count"] >= resources
    assert found["dockerfile"]["summary"]["resource_count"] == 1
    for framework, report in found.items():
        assert report["summary"]["passed"] > 50, framework
        assert report["summary"]["parsing_errors"] == 0, report["results"]["parsing_errors"]
        assert report["summary"]["failed"] == 0, [
            (c["check_id"], c["file_path"], c["resource"])
            for c in report["results"]["failed_checks"]]
    skipped = {(c["check_id"], Path(c["file_path"]).name)
               for report in found.values() for c in report["results"]["skipped_checks"]}
    assert skipped == documented_skips()
    for report in found.values():
        for check in report["results"]["skipped_checks"]:
            reason = check["check_result"]["suppress_comment"]
            assert len(reason) > 30, check  # a reason, not a shrug


def test_checkov_fails_a_pod_without_its_security_context(checkov_bin, tmp_path):
    """The scan can fail: the pipeline Job without its security contexts and the Dockerfile
    without its skip comment fail the checks the issue listed."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    path = copy / "k8s" / "pipeline-job.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    del job["spec"]["template"]["spec"]["securityContext"]
    del job["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    path.write_text(yaml.safe_dump_all(docs))
    dockerfile = copy / "Dockerfile"
    dockerfile.write_text(re.sub(r"^# checkov:skip=.*\n", "", dockerfile.read_text(),
                                 flags=re.M))
    found = checkov(checkov_bin, copy)
    failed = {c["check_id"] for report in found.values()
              for c in report["results"]["failed_checks"]}
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_31",
            "CKV_K8S_37", "CKV_K8S_40", "CKV_DOCKER_2"} <= failed, failed


# --------------------------------------------------------------------------- the pods

UID = image_user()
ADMIN_PASSWORD = "pod-test-admin-password"
CREDENTIALS = ("[mlflow]\nmlflow_tracking_username = admin\n"
               f"mlflow_tracking_password = {ADMIN_PASSWORD}\n")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
    reason="the pod emulation needs root (a private mount namespace) and util-linux")


@contextlib.contextmanager
def pod_stage():
    stage = pods.new_stage()
    try:
        yield stage
    finally:
        pods.remove_stage(stage)


@needs_root
def test_the_pod_emulation_is_read_only_non_root_and_without_privileges():
    """What the pod tests below rest on: in the emulated pod the command runs as the image's
    UID, with no_new_privs and no capabilities; the project, the interpreter, /tmp and
    /var/tmp are read-only; $HOME and $TMPDIR (the emptyDirs) are writable; the login is a
    read-only file, readable by the pod's group only."""
    probe = """
        set -u
        id -u; id -g; id -G; id -un
        grep -E "^(NoNewPrivs|CapEff|CapBnd):" /proc/self/status | sort
        for f in "$PWD/.probe" "$VIRTUAL/.probe" /tmp/.probe /var/tmp/.probe "$HOME/.mlflow/x"; do
            touch "$f" 2>/dev/null && echo "wrote $f"
        done
        touch "$HOME/.probe" "$TMPDIR/.probe" && echo volumes writable
        stat -c '%a %g' "$HOME/.mlflow/credentials"
        python -c 'import torch, mlflow, steps; print("imports", steps.__file__)'
    """
    with pod_stage() as stage:
        pod = pods.Pod(stage, "pipeline-job.yaml", "Job", credentials=CREDENTIALS)
        env = pod.env({"mlflow-tracking": {"uri": "http://127.0.0.1:9"}},
                      VIRTUAL=str(Path(VENV_BIN).parent))
        result = pod.run(["/bin/sh", "-c", probe], env, timeout=120)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[:4] == [str(UID), str(UID), str(UID), "pipeline"]  # the image's user
        assert lines[4:7] == ["CapBnd:\t0000000000000000", "CapEff:\t0000000000000000",
                              "NoNewPrivs:\t1"]
        assert lines[7:] == ["volumes writable", f"440 {UID}",
                             f"imports {ROOT / 'steps' / '__init__.py'}"], result.stdout
        assert sorted(os.listdir(stage / "volumes" / "tmp")) == [".probe"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A basic-auth tracking server standing for the cluster's, the ConfigMaps, and this
    process logged in as admin (the pods get the login only as their mounted file)."""
    import mlflow

    root = tmp_path_factory.mktemp("cluster")
    with basic_auth_server(root, ADMIN_PASSWORD) as url, pytest.MonkeyPatch.context() as env:
        for key, value in (("MLFLOW_TRACKING_URI", url), ("MLFLOW_TRACKING_USERNAME", "admin"),
                           ("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)):
            env.setenv(key, value)
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(url)
        try:
            yield {"url": url, "root": root, "config_maps": {"mlflow-tracking": {"uri": url}}}
        finally:
            mlflow.set_tracking_uri(previous)


def assert_wrote_only_their_volumes(*stages: Path) -> None:
    """Nothing the pods' UID owns outside their volumes, in the places a process could
    write to were they not read-only (the pods' own views are)."""
    written = pods.files_of_uid(UID, "/tmp", "/var/tmp", "/dev/shm", str(ROOT),
                                outside=tuple(stage / "volumes" for stage in stages))
    assert written == []


def with_params(args: list[str], **values: str) -> list[str]:
    """``-P name=value`` args with ``values`` put in place of the manifest's own."""
    args = list(args)
    for i, word in enumerate(args):
        name = word.partition("=")[0]
        if i and args[i - 1] == "-P" and name in values:
            args[i] = f"{name}={values.pop(name)}"
    assert not values, values
    return args


@pytest.fixture(scope="module")
def pipeline_pod(cluster):
    """The pipeline Job's pod: the image's entry point with the manifest's args (the
    digits set and one epoch instead of MNIST's five); its output, the steps' runs."""
    import mlflow

    with pod_stage() as stage:
        pod = pods.Pod(stage, "pipeline-job.yaml", "Job", credentials=CREDENTIALS)
        args = with_params(pod.container["args"], dataset="digits", epochs="1")
        result = pod.run([*image_entrypoint(), *args], pod.env(cluster["config_maps"]))
        assert_wrote_only_their_volumes(stage)
    client = mlflow.MlflowClient()
    steps = {r.data.tags.get("pipeline.step"): r.info.status for r in client.search_runs(["0"])}
    yield {"result": result, "steps": steps}


@needs_root
@pytest.mark.slow
def test_the_pipeline_job_runs_as_its_restricted_pod(cluster, pipeline_pod):
    import mlflow

    result = pipeline_pod["result"]
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Read-only file system" not in result.stderr
    assert pipeline_pod["steps"] == {"main": "FINISHED", "download_data": "FINISHED",
                                     "train": "FINISHED", "evaluate": "FINISHED",
                                     "register": "FINISHED"}
    champion = mlflow.MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    assert len(champion.tags["model_digest"]) == 64
    assert ADMIN_PASSWORD not in result.stdout + result.stderr


def start_serving_pod(stage: Path, cluster: dict) -> tuple[pods.Pod, subprocess.Popen, int]:
    """The serving Deployment's pod, its script as written but for the address: 127.0.0.1
    and a free port instead of 0.0.0.0:8080 (this machine is shared)."""
    pod = pods.Pod(stage, "serve.yaml", "Deployment", credentials=CREDENTIALS)
    port = free_port()
    script = pod.container["args"][0]
    assert "--host 0.0.0.0 --port 8080" in script
    script = script.replace("--host 0.0.0.0 --port 8080", f"--host 127.0.0.1 --port {port}")
    proc = pod.start([*pod.container["command"], script], pod.env(cluster["config_maps"]),
                     log=stage / "pod.log")
    return pod, proc, port


def invocations(url: str, images) -> list[int]:
    request = urllib.request.Request(f"{url}/invocations",
                                     data=json.dumps({"inputs": images.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return [p["label"] for p in json.loads(response.read())["predictions"]]


@contextlib.contextmanager
def champion_edited_on_the_server(root: Path):
    """The champion's ``code/model.py`` in the server's artifact store with a line added;
    restored afterwards."""
    import mlflow

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("mnist-classifier", "champion")
    model_id = version.tags["model_uri"].removeprefix("models:/")
    location = urllib.parse.urlparse(client.get_logged_model(model_id).artifact_location)
    code = root / "artifacts" / location.path.lstrip("/") / "code" / "model.py"
    original = code.read_text()
    code.write_text(original + "\nprint('edited')\n")
    try:
        yield f"mnist-classifier v{version.version}"
    finally:
        code.write_text(original)


@needs_root
@pytest.mark.slow
def test_the_serving_pod_serves_the_champion_and_refuses_it_edited(cluster, pipeline_pod):
    import mlflow

    from steps.core.data import load_digits_dataset

    assert pipeline_pod["result"].returncode == 0, pipeline_pod["result"].stderr[-3000:]
    images = load_digits_dataset().x_test[:8]
    expected = mlflow.pyfunc.load_model("models:/mnist-classifier@champion").predict(images)
    with pod_stage() as stage:
        pod, proc, port = start_serving_pod(stage, cluster)
        url = f"http://127.0.0.1:{port}"
        log = stage / "pod.log"
        try:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                wait_for_http(url + pod.container[probe]["httpGet"]["path"], proc,
                              lambda: log.read_text()[-3000:], timeout=180)
            assert invocations(url, images) == expected["label"].tolist()
        finally:
            pods.stop(proc)
        assert "Read-only file system" not in log.read_text()
        assert_wrote_only_their_volumes(stage)
    with champion_edited_on_the_server(cluster["root"]) as named, pod_stage() as stage:
        pod, proc, _ = start_serving_pod(stage, cluster)
        try:
            proc.wait(timeout=180)
        finally:
            pods.stop(proc)
        stderr = (stage / "pod.log").read_text()
        assert proc.returncode == 1, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and named in errors[0], stderr[-3000:]
        assert "has changed since it was recorded" in errors[0]


@needs_root
@pytest.mark.slow
def test_the_multinode_pods_train_as_their_restricted_pods(cluster, pipeline_pod):
    """Both pods of the Indexed Job, each in a pod of its own, on loopback: pod 0 under
    ``mlflow run`` (the one train run), pod 1 the worker command."""
    import mlflow

    assert pipeline_pod["result"].returncode == 0, pipeline_pod["result"].stderr[-3000:]
    config = next(d for d in manifests()["train-multinode.yaml"]
                  if d["kind"] == "ConfigMap")["data"]
    config_maps = {**cluster["config_maps"], "mnist-train": {
        **config, "EPOCHS": "1", "DATA_URI": "", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}}
    client = mlflow.MlflowClient()
    before = {r.info.run_id for r in client.search_runs(["0"])}
    with pod_stage() as stage0, pod_stage() as stage1:
        started = {}
        for index, stage in ((1, stage1), (0, stage0)):  # the worker first, as in a cluster
            pod = pods.Pod(stage, "train-multinode.yaml", "Job", credentials=CREDENTIALS)
            env = pod.env(config_maps, JOB_COMPLETION_INDEX=str(index))
            started[index] = pod.start([*pod.container["command"], *pod.container["args"]],
                                       env, log=stage / "pod.log")
        try:
            for proc in started.values():
                proc.wait(timeout=600)
        finally:
            for proc in started.values():
                pods.stop(proc)
        for index, stage in ((0, stage0), (1, stage1)):
            assert started[index].returncode == 0, (stage / "pod.log").read_text()[-3000:]
        assert_wrote_only_their_volumes(stage0, stage1)
    (run,) = [r for r in client.search_runs(["0"]) if r.info.run_id not in before]
    assert run.info.status == "FINISHED"
    assert run.data.params["nodes"] == "2" and run.data.tags["pipeline.step"] == "train"
