"""A manifest's container command run as Kubernetes would run it under the manifests'
restricted settings, as far as one machine without a container runtime can show them.

What is reproduced (root is needed, for a private mount namespace; nothing outside it sees
a change):

- ``readOnlyRootFilesystem``: every mount but /proc, /sys and /dev is remounted read-only
  in the namespace; the project, the virtualenv and the interpreter are read where they
  are. The pod's emptyDir volumes are fresh folders, the only writable places; the login
  Secret is a read-only folder at the volume's mount path, mode 0440, group fsGroup.
- ``runAsUser``/``runAsGroup``/``fsGroup``: the command runs as that uid, with that gid and
  fsGroup as its one supplementary group (``setpriv``); /etc/passwd and /etc/group know
  the user and group the Dockerfile creates, as the image's do.
- ``allowPrivilegeEscalation: false``: no_new_privs; ``capabilities: drop: [ALL]``: empty
  inheritable and bounding sets.
- The environment is the image's ``ENV`` (deploy/Dockerfile), then the container's
  ``envFrom``/``env`` as given; the working folder is the project (the image's /app), and
  the preflight plugin is imported from it, as the image's is.

What is not: the seccomp profile, the image's own filesystem (the project's venv stands for
the image's site-packages), the pod's network and PID namespaces, and the resource limits.
The volumes are not at their mount paths (/tmp, /home/pipeline): they are folders here,
and the environment values naming a mount path are rewritten to name the folder instead;
/tmp itself stays read-only, which is stricter than the pod.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import yaml

from helpers.processes import VENV_BIN
from steps.tracking.runtime.project import PROJECT_DIR

DEPLOY = PROJECT_DIR / "deploy"
FILESYSTEMS_LEFT_WRITABLE = ("/proc", "/sys", "/dev")


def image_env() -> dict[str, str]:
    """The ``ENV`` instructions of deploy/Dockerfile, as the image sets them."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def pod_template(manifest: str, kind: str) -> dict:
    doc = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / manifest).read_text())
               if d["kind"] == kind)
    return doc["spec"]["template"]["spec"]


def _blocked_ancestor(path: Path) -> Path | None:
    """The topmost folder above ``path`` that other users may not enter (/root, 0700)."""
    for parent in reversed(path.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


class Pod:
    """One pod of a manifest: ``Pod(stage, "pipeline-job.yaml", "Job")``, then ``start``."""

    def __init__(self, stage: Path, manifest: str, kind: str, credentials: str = "") -> None:
        self.spec = pod_template(manifest, kind)
        self.container = self.spec["containers"][0]
        security = self.spec["securityContext"]
        self.uid, self.gid = security["runAsUser"], security["runAsGroup"]
        self.fs_group = security["fsGroup"]
        self.root = stage
        self.volumes: dict[str, Path] = {}  # mount path -> the folder standing for it
        self.mounts: list[str] = []  # the namespace's setup, as shell lines
        self._lay_out_volumes(credentials)

    def _lay_out_volumes(self, credentials: str) -> None:
        by_name = {v["name"]: v for v in self.spec.get("volumes", [])}
        mounts = sorted(self.container.get("volumeMounts", []),
                        key=lambda m: m["mountPath"].count("/"))
        for mount in mounts:
            volume, path = by_name[mount["name"]], mount["mountPath"]
            parent = next((p for p in sorted(self.volumes, key=len, reverse=True)
                           if path.startswith(p + "/")), None)
            if parent is not None:  # a mount inside another volume: its mount point
                folder = self.volumes[parent] / path[len(parent) + 1:]
                folder.mkdir(parents=True)
            else:
                folder = self.root / "volumes" / mount["name"]
                folder.mkdir(parents=True)
                os.chown(folder, self.uid, self.fs_group)
                folder.chmod(0o777)  # an emptyDir's mode
            if "emptyDir" in volume:
                self.mounts.append(f"mount --bind {shlex.quote(str(folder))} "
                                   f"{shlex.quote(str(folder))}")
            elif "secret" in volume:
                source = self.root / "secrets" / mount["name"]
                source.mkdir(parents=True)
                source.chmod(0o755)
                for item in volume["secret"]["items"]:
                    if credentials:
                        secret_file = source / item["path"]
                        secret_file.write_text(credentials)
                        os.chown(secret_file, 0, self.fs_group)
                        secret_file.chmod(volume["secret"]["defaultMode"])
                self.mounts += [
                    f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(folder))}",
                    f"mount -o remount,bind,ro {shlex.quote(str(folder))}"]
            else:
                raise AssertionError(f"a volume this emulation does not know: {volume}")
            self.volumes[path] = folder

    def translated(self, value: str) -> str:
        # This checkout and its virtualenv are the image's files, wherever the clone lies
        # (under /tmp, a volume's mount path, on a CI machine): never a volume.
        if value.startswith((str(PROJECT_DIR), sys.prefix, VENV_BIN)):
            return value
        for path in sorted(self.volumes, key=len, reverse=True):
            if value == path or value.startswith(path + "/"):
                return str(self.volumes[path]) + value[len(path):]
        return value

    def env(self, config_maps: dict[str, dict[str, str]], **extra: str) -> dict[str, str]:
        """The container's environment: the image's ENV, the ConfigMaps of its ``envFrom``,
        its ``env`` (``config_maps``: each ConfigMap's data by its name), then ``extra``;
        values naming a mount path rewritten."""
        env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", **image_env(),
               # The image installs the preflight plugin from the project it ships; an
               # editable install may point at another checkout (a shared virtualenv).
               "PYTHONPATH": str(PROJECT_DIR / "plugins" / "preflight" / "src")}
        for source in self.container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]])
        for item in self.container.get("env", []):
            source = item.get("valueFrom", {})
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[item["name"]] = config_maps[ref["name"]][ref["key"]]
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                kind, _, name = resource.partition(".")
                env[item["name"]] = str(self.container["resources"][kind][name])
            else:
                raise AssertionError(f"an env source this emulation does not know: {item}")
        env.update(extra)
        return {key: self.translated(value) for key, value in env.items()}

    def _image_user(self) -> list[str]:
        """The user and group deploy/Dockerfile creates, added to copies of this machine's
        /etc/passwd and /etc/group that stand for the image's (MLflow asks for the user's
        name: ``getpass.getuser``)."""
        text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
        group = re.search(r"groupadd --gid (\d+) (\w+)", text)
        user = re.search(r"useradd .*--uid (\d+) --gid (\d+) (\w+)", text)
        assert user and group and int(user.group(1)) == self.uid, "the image's user"
        lines = []
        for name, entry in (("passwd", f"{user.group(3)}:x:{user.group(1)}:{user.group(2)}::"
                                       f"/home/{user.group(3)}:/bin/sh"),
                            ("group", f"{group.group(2)}:x:{group.group(1)}:")):
            copy = self.root / "etc" / name
            copy.parent.mkdir(exist_ok=True)
            copy.write_text(Path("/etc", name).read_text() + entry + "\n")
            copy.chmod(0o644)
            lines.append(f"mount --bind {shlex.quote(str(copy))} /etc/{name}")
        return lines

    def _setup_script(self) -> str:
        lines = ["set -e", *self.mounts, *self._image_user()]
        # The interpreter, the virtualenv and the project, reachable by a non-root user where
        # a folder above them is not (/root is 0700 here): that folder is replaced, in the
        # namespace only, by a view holding just those paths.
        needed = [Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), PROJECT_DIR]
        views: dict[Path, list[Path]] = {}
        for path in sorted(set(needed), key=lambda p: len(p.parts)):
            blocked = _blocked_ancestor(path)
            if blocked is not None and not any(path.is_relative_to(p)
                                               for p in views.get(blocked, [])):
                views.setdefault(blocked, []).append(path)
        for i, (blocked, paths) in enumerate(views.items()):
            view = self.root / "views" / str(i)
            for path in paths:
                inside = view / path.relative_to(blocked)
                inside.mkdir(parents=True, exist_ok=True)
                for folder in [inside, *inside.parents]:
                    if folder == self.root:
                        break
                    folder.chmod(0o755)
                lines.append(f"mount --bind {shlex.quote(str(path))} "
                             f"{shlex.quote(str(inside))}")
            lines.append(f"mount --rbind {shlex.quote(str(view))} {shlex.quote(str(blocked))}")
        # readOnlyRootFilesystem: everything read-only but the volumes (and /proc, /sys, /dev)
        keep = {str(folder) for folder in self.volumes.values()}
        lines.append(
            "awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do\n"
            "  m=$(printf '%b' \"$m\")\n"
            "  case \"$m\" in " + "|".join(f"{p}|{p}/*" for p in FILESYSTEMS_LEFT_WRITABLE)
            + ") continue;; esac\n"
            "  case \" " + " ".join(shlex.quote(k) for k in keep) + " \" in *\" $m \"*) continue;; esac\n"
            "  mount -o remount,bind,ro \"$m\" 2>/dev/null || true\n"
            "done")
        return "\n".join(lines)

    def start(self, command: list[str], env: dict[str, str],
              log: Path | None = None) -> subprocess.Popen:
        """``command`` (the container's command and args) started in the pod; its output
        piped, or written to ``log`` (for a pod that runs while others are waited for)."""
        script = (self._setup_script() + f"\ncd {shlex.quote(str(PROJECT_DIR))}\n"
                  f"exec setpriv --reuid={self.uid} --regid={self.gid} "
                  f"--groups={self.fs_group} --no-new-privs --inh-caps=-all "
                  "--bounding-set=-all -- \"$@\"")
        output = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        if log is not None:
            with open(log, "w") as file:  # the child keeps its own copy of the descriptor
                return subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                     script, "pod", *command], env=env, text=True, stdout=file,
                    stderr=subprocess.STDOUT, start_new_session=True)
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script,
             "pod", *command], env=env, text=True, start_new_session=True, **output)

    def run(self, command: list[str], env: dict[str, str],
            timeout: float = 600) -> subprocess.CompletedProcess:
        proc = self.start(command, env)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            stop(proc)
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def stop(proc: subprocess.Popen) -> None:
    """End a pod: its first process and every process it started, as the kubelet does."""
    try:
        processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
    except psutil.NoSuchProcess:
        processes = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=20)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    if proc.returncode is None:
        proc.communicate(timeout=30)


def new_stage() -> Path:
    """A folder other users can enter (pytest's base temp dir is private to root)."""
    stage = Path(tempfile.mkdtemp(prefix="mnist-pod-"))
    stage.chmod(0o755)
    return stage


def remove_stage(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)


def files_of_uid(uid: int, *folders: str, outside: tuple[Path, ...] = ()) -> list[str]:
    """Files and folders owned by ``uid`` under ``folders`` (not under ``outside``)."""
    found = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            if any(here.is_relative_to(o) for o in outside):
                dirnames[:] = []
                continue
            for name in dirnames + filenames:
                try:
                    if os.lstat(here / name).st_uid == uid:
                        found.append(str(here / name))
                except OSError:
                    pass
    return found
