"""Data-parallel and multi-node ``train`` (torch.distributed, gloo on CPU).

- ``workers=2`` trains the model ``workers=1`` trains (the mlp; per-epoch train_loss within
  1e-3 relative, val_accuracy within 0.005) on 6000 digit images, under real ``mlflow run``;
  one run, one value per metric per epoch, one pair of logged models.
- Two "nodes" of one worker each, started from the commands in
  ``deploy/k8s/train-multinode.yaml`` as separate process groups on 127.0.0.1, give the
  ``workers=2`` result.
- A rank killed mid-training brings ``main`` down within seconds: train FAILED naming the
  rank, nothing evaluated or registered, no process left; Ctrl-C leaves it KILLED.
- With ``max_restarts=1`` the same kill (rank 1, during epoch 2 of 4) costs one restart:
  the agent starts both ranks again, they continue from the epoch-1 checkpoint, and the one
  run ends FINISHED with the uninterrupted ``workers=2`` metrics.
- Two manifest pods, pod 1's processes all killed mid-epoch and the pod started again: it
  rejoins the c10d rendezvous and the one run ends FINISHED with the two-node result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import yaml

from helpers.data import write_idx_folder
from helpers.processes import (
    PROJECT_DIR,
    VENV_BIN,
    assert_group_gone,
    free_port,
    mlflow_run,
    run_step,
    start,
    subprocess_env,
)
from helpers.store import temporary_store, wait_for_training
from helpers.waiting import wait_until
from steps.tracking.runtime import tags
from steps.tracking.training import elastic
from tools.job_ranks import ranks_of

EPOCHS = 4
N_IMAGES = 6000
MANIFEST = PROJECT_DIR / "deploy" / "k8s" / "train-multinode.yaml"


# --------------------------------------------------------------------------- fast checks


def test_cuda_wants_one_gpu_per_worker(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="workers=2 needs 2 CUDA GPUs.*it has 1"):
        elastic.ScaleOut(workers=2).check_devices("cuda")
    elastic.ScaleOut(workers=2).check_devices("cpu")
    elastic.ScaleOut(workers=1).check_devices("cuda")


def _report(at: float, detail: str, interrupted: bool = False, final: bool = False) -> dict:
    """A rank's error file as :func:`elastic.report_failure` leaves it."""
    return {"message": detail, "timestamp": int(at), "pipeline_time": at,
            "interrupted": interrupted, "final": final, "detail": detail}


def _failure(tmp_path: Path, rank: int, exitcode: int, report: dict | None):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    tmp_path.mkdir(exist_ok=True)
    error_file = tmp_path / f"error-{rank}.json"
    if report is not None:
        error_file.write_text(json.dumps(report))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode,
                          error_file=str(error_file))


LOST_PEER = _report(20.0, "RuntimeError: Connection closed by peer")
BAD_DATA = _report(10.0, "data=runs:/x/data cannot be read", final=True)


def test_root_cause_is_the_rank_that_failed_first_not_the_one_that_lost_its_peer(tmp_path):
    failures = {0: _failure(tmp_path, 0, 1, LOST_PEER), 1: _failure(tmp_path, 1, 1, BAD_DATA)}
    assert elastic.root_cause(failures) == elastic.RankFailure(
        elastic.FAILED, 1, "data=runs:/x/data cannot be read", final=True)
    # A rank killed outright (OOM killer, kill -9) is the cause whatever the others wrote.
    failures = {0: _failure(tmp_path, 0, 1, LOST_PEER), 1: _failure(tmp_path, 1, -9, None)}
    assert elastic.root_cause(failures) == elastic.RankFailure(
        elastic.KILLED_BY_SIGNAL, 1, "SIGKILL")
    # SIGTERM to one rank ends the job as an interrupt.
    stopped = _report(5.0, "SIGTERM", interrupted=True)
    failures = {0: _failure(tmp_path, 0, 1, LOST_PEER), 1: _failure(tmp_path, 1, 130, stopped)}
    assert elastic.root_cause(failures) == elastic.RankFailure(elastic.INTERRUPTED, 1,
                                                               "SIGTERM")
    # No report at all, and no signal: the first to exit, by its exit code.
    failures = {0: _failure(tmp_path / "q", 0, 3, None)}
    assert elastic.root_cause(failures) == elastic.RankFailure(elastic.FAILED, 0,
                                                               "exited with code 3")


def test_each_rank_failure_reads_as_one_line():
    """The wording, checked once; everything else asserts on the kinds."""
    said = {kind: elastic.RankFailure(kind, 1, detail).said() for kind, detail in (
        (elastic.KILLED_BY_SIGNAL, "SIGKILL"), (elastic.NO_REPORT, ""),
        (elastic.INTERRUPTED, "SIGTERM"), (elastic.ELSEWHERE, ""),
        (elastic.FAILED, "data=runs:/x/data cannot be read"))}
    assert said == {
        elastic.KILLED_BY_SIGNAL: "rank 1 was killed by signal SIGKILL",
        elastic.NO_REPORT: "rank 1 was killed without a word (it left no error report: "
                           "SIGKILL, the OOM killer or a crash)",
        elastic.INTERRUPTED: "rank 1 was interrupted (SIGTERM)",
        elastic.ELSEWHERE: "a rank on another node failed, or a node joined the job",
        elastic.FAILED: "rank 1 failed: data=runs:/x/data cannot be read"}


def _restarted_rank(tmp_path: Path, monkeypatch, previous: dict[int, dict | None]) -> None:
    """This process as local rank 0 of a node's second attempt, the first attempt's ranks
    having left ``previous`` (local rank -> report, None: no file) where torch's
    DefaultLogsSpecs puts them."""
    for local, report in previous.items():
        folder = tmp_path / "mnist-train" / "attempt_0" / str(local)
        folder.mkdir(parents=True)
        if report is not None:
            (folder / "error.json").write_text(json.dumps(report))
    mine = tmp_path / "mnist-train" / "attempt_1" / "0"
    mine.mkdir(parents=True)  # torch makes each rank's folder before starting it
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(mine / "error.json"))
    for name, value in (("TORCHELASTIC_RESTART_COUNT", "1"), ("RANK", "0"),
                        ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", str(len(previous)))):
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("previous, cause", [
    ({0: LOST_PEER, 1: None}, elastic.RankFailure(elastic.NO_REPORT, 1)),
    ({0: LOST_PEER, 1: BAD_DATA},
     elastic.RankFailure(elastic.FAILED, 1, "data=runs:/x/data cannot be read", final=True)),
    ({0: _report(3.0, "SIGTERM", interrupted=True), 1: _report(4.0, "SIGTERM", True)},
     elastic.RankFailure(elastic.ELSEWHERE)),
])
def test_a_restarted_rank_reads_why_from_the_previous_attempts_error_files(
        tmp_path, monkeypatch, previous, cause):
    _restarted_rank(tmp_path, monkeypatch, previous)
    assert elastic.previous_attempt() == cause


def test_a_failure_no_restart_can_mend_ends_the_next_attempt_at_once(tmp_path, monkeypatch):
    """A rank's StepError (bad data, diverged training) would meet every restart again: the
    restarted rank repeats it as that rank's failure before joining the group, and leaves
    it in its own error file, so the job ends naming the first cause."""
    _restarted_rank(tmp_path, monkeypatch, {0: LOST_PEER, 1: BAD_DATA})
    monkeypatch.setattr(elastic, "follow_the_agent", lambda: None)  # no agent here
    with pytest.raises(elastic.RepeatedFailure) as raised:
        elastic.join_job()
    assert raised.value.failure.rank == 1 and raised.value.failure.final
    elastic.report_failure(raised.value)
    left = json.loads(Path(os.environ["TORCHELASTIC_ERROR_FILE"]).read_text())
    assert (left["rank"], left["detail"], left["final"]) == (
        1, "data=runs:/x/data cannot be read", True)


def test_fifty_long_restart_causes_keep_the_newest_that_fit_mlflows_tag_limit(tracking_uri):
    """MLflow cuts a tag at 8,000 characters: the record tags keep valid JSON of the newest
    records, each text shortened."""
    from steps.tracking.runtime.runs import RECORD_TEXT_LIMIT, TAG_VALUE_LIMIT, add_record, records

    client = mlflow.MlflowClient()
    run_id = client.create_run("0").info.run_id
    for n in range(50):
        add_record(run_id, tags.RESTARTS, {"restart": n, "because": f"{n}: " + "x" * 2000})
        add_record(run_id, tags.RESUMES, {"after": "KILLED", "because": f"{n}: " + "y" * 900})
    stored = client.get_run(run_id).data.tags
    for tag in (tags.RESTARTS, tags.RESUMES):
        assert len(stored[tag]) <= TAG_VALUE_LIMIT
        kept = records(stored, tag)
        assert len(kept) >= 10, tag  # shortened, enough of them fit
        assert [r.get("restart", int(r["because"].split(":")[0])) for r in kept] == list(
            range(50 - len(kept), 50))  # the newest, in order
        assert all(len(r["because"]) <= RECORD_TEXT_LIMIT for r in kept)


def _multinode_script() -> str:
    job = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    return container["args"][0]


def test_the_multinode_manifest_wires_pods_to_the_rendezvous():
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    config, job, service = docs["ConfigMap"]["data"], docs["Job"]["spec"], docs["Service"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == int(config["NODES"])
    # Pod 0's stable name: <job>-0.<subdomain>, served by the headless Service.
    assert job["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    host, port = config["RDZV_ENDPOINT"].split(":")
    assert host == f"{docs['Job']['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    elastic.ScaleOut(int(config["WORKERS"]), int(config["NODES"]), 1,
                         config["RDZV_ENDPOINT"]).check(64)


# --------------------------------------------------------------------------- real jobs


def metric_histories(run_id: str) -> dict[str, list[float]]:
    client = mlflow.MlflowClient()
    histories = {}
    for key in ("train_loss", "val_loss", "val_accuracy"):
        points = client.get_metric_history(run_id, key)
        assert sorted(p.step for p in points) == list(range(1, EPOCHS + 1)), key
        histories[key] = [p.value for p in sorted(points, key=lambda p: p.step)]
    return histories


# These jobs train the mlp: its workers=2 run matches workers=1 to rounding. The cnn's
# convolutions carry the replicas' other summation order much further (docs/scaling-out.md:
# in one process, splitting each batch's forward in two moves the default cnn recipe's
# epoch-3 train_loss by 2.8%), too far for an equality test to tell a bug from rounding.
ARCH = ("-P", "arch=mlp")


def assert_same_training(a: dict, b: dict) -> None:
    for loss_a, loss_b in zip(a["train_loss"], b["train_loss"], strict=True):
        assert abs(loss_a - loss_b) <= 1e-3 * abs(loss_a), (a, b)
    for acc_a, acc_b in zip(a["val_accuracy"], b["val_accuracy"], strict=True):
        assert abs(acc_a - acc_b) <= 0.005, (a, b)


def train_runs() -> list:
    return mlflow.MlflowClient().search_runs(["0"], "tags.`pipeline.step` = 'train'")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """One store: a 6000-image data run, then train with workers=1 and workers=2 under
    ``mlflow run``; their run ids."""
    root = tmp_path_factory.mktemp("ddp")
    with temporary_store(root):
        folder = write_idx_folder(root / "idx", n_train=N_IMAGES, n_test=200)
        assert run_step("download_data", "--data-dir", str(folder)).returncode == 0
        data = mlflow.MlflowClient().search_runs(["0"])[0].data.tags[tags.DATA_URI]
        ids, new_runs = {}, {}
        for workers in (1, 2):
            before = {r.info.run_id for r in train_runs()}
            result = mlflow_run("-e", "train", "-P", f"data={data}", "-P", f"epochs={EPOCHS}",
                                "-P", f"workers={workers}", "-P", "device=cpu", *ARCH)
            assert result.returncode == 0, result.stderr[-3000:]
            new_runs[workers] = [r.info.run_id for r in train_runs()
                                 if r.info.run_id not in before]
            ids[workers] = new_runs[workers][0]
        yield {"root": root, "folder": folder, "data": data, "new_runs": new_runs, **ids}


@pytest.mark.slow
def test_two_workers_train_the_model_one_worker_trains(jobs):
    with temporary_store(jobs["root"]):
        client = mlflow.MlflowClient()
        assert_same_training(metric_histories(jobs[1]), metric_histories(jobs[2]))
        run = client.get_run(jobs[2])
        assert run.info.status == "FINISHED"
        assert run.data.params["workers"] == "2"
        assert jobs["new_runs"][2] == [jobs[2]]  # one run per job, none from the other rank
        models = mlflow.search_logged_models(experiment_ids=["0"], output_format="list",
                                             filter_string=f"source_run_id = '{jobs[2]}'")
        assert sorted(m.name for m in models) == ["classifier", "model"]
        loaded = mlflow.pyfunc.load_model(run.data.tags[tags.MODEL_URI])
        answer = loaded.predict(np.zeros((2, 28, 28), np.uint8))
        assert answer["label"].shape == (2,) and set(answer["label"]) <= set(range(10))


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torch's agent starts its ranks in sessions of
    their own, so a process group does not hold them)."""
    return [child.pid for child in psutil.Process(pid).children()]


def _new_train_run(before: set, proc: subprocess.Popen, epoch: int = 1,
                   timeout: float = 180) -> str:
    """The train run that is not in ``before``, once it has logged ``epoch`` (0: once it
    exists)."""
    client = mlflow.MlflowClient()

    def reached() -> str:
        return next((run.info.run_id for run in train_runs()
                     if run.info.run_id not in before and (epoch == 0 or any(
                         m.step >= epoch for m in
                         client.get_metric_history(run.info.run_id, "val_accuracy")))), "")

    return wait_until(reached, timeout, f"a new train run to reach epoch {epoch}", poll=0.05,
                      give_up=lambda: proc.poll() is not None and
                      proc.communicate()[1][-3000:])


@pytest.mark.slow
def test_a_rank_killed_in_epoch_2_costs_one_restart_not_the_training(jobs):
    """``max_restarts=1``: rank 1 SIGKILLed after epoch 1, during epoch 2 of 4 (or 3, on a
    busy machine); the agent restarts both ranks, which continue from the checkpoint of the
    last finished epoch in the same run."""
    with temporary_store(jobs["root"]):
        client = mlflow.MlflowClient()
        before = {r.info.run_id for r in train_runs()}
        proc = start([os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "-e",
                      "train", "--env-manager", "local", "-P", f"data={jobs['data']}",
                      "-P", f"epochs={EPOCHS}", "-P", "workers=2", "-P", "device=cpu", *ARCH,
                      "-P", "max_restarts=1"])
        run_id = _new_train_run(before, proc, epoch=0)
        ranks = _every_rank_of(run_id)
        assert sorted(ranks) == [0, 1]
        _new_train_run(before, proc, epoch=1)
        os.kill(ranks[1], signal.SIGKILL)
        # The epochs done when the kill landed, read once the agent has stopped rank 0 too
        # (before the restarted ranks exist): an mlp epoch here takes about 0.2 s, so on a
        # busy machine the kill can land in epoch 3 rather than 2.
        first_rank_0 = psutil.Process(ranks[0])

        def stopped() -> bool:
            try:
                return first_rank_0.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(stopped, 60, "the agent to stop the first attempt's rank 0", poll=0.05)
        done = max(m.step for m in client.get_metric_history(run_id, "val_accuracy"))
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        # The restarted tracking rank reads why from the error files torch keeps for the
        # attempt: rank 1 left none (SIGKILL gives no chance to write one).
        lost = elastic.RankFailure(elastic.NO_REPORT, 1)
        assert f"{lost.said()}; restart 1 of 1" in stderr
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        restarts = json.loads(run.data.tags[tags.RESTARTS])
        assert 1 <= done < EPOCHS
        assert [(r["restart"], r["kind"], r["rank"], r["from_epoch"]) for r in restarts] == [
            (1, elastic.NO_REPORT, 1, done + 1)]
        # Every epoch logged once (metric_histories checks the steps), and the training
        # is the uninterrupted one's, bit for bit.
        assert metric_histories(run_id) == metric_histories(jobs[2])
        assert ranks_of(run_id) == {}


def _multinode_config() -> dict[str, str]:
    config = next(d for d in yaml.safe_load_all(MANIFEST.read_text())
                  if d["kind"] == "ConfigMap")["data"]
    assert int(config["MAX_RESTARTS"]) >= 1
    return config


def _pod_starter(config: dict[str, str], data: str):
    """start(index): the manifest's own script run as that pod would run it, on loopback."""
    script = _multinode_script()
    pod_env = {**config, "EPOCHS": str(EPOCHS), "ARCH": ARCH[1].split("=")[1], "DATA_URI": data,
               "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}

    def start_pod(index: int) -> subprocess.Popen:
        return subprocess.Popen(["/bin/sh", "-c", script], cwd=PROJECT_DIR, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=subprocess_env(JOB_COMPLETION_INDEX=str(index), **pod_env),
                                start_new_session=True)

    return start_pod


@pytest.mark.slow
def test_two_manifest_pods_survive_losing_pod_1_and_train_what_two_workers_train(jobs):
    """The manifest's own script, run as pod 1 and pod 0 would run it, on loopback; then
    every process of pod 1 is killed during epoch 2 and pod 1 is started again, as the Job
    would replace it: it rejoins, and the one run ends with the two-worker result."""
    config = _multinode_config()
    start_pod = _pod_starter(config, jobs["data"])
    with temporary_store(jobs["root"]):
        client = mlflow.MlflowClient()
        before = {r.info.run_id for r in train_runs()}
        pod1 = start_pod(1)  # the worker first: it waits for pod 0's store
        pod0 = start_pod(0)
        run_id = _new_train_run(before, pod0, epoch=1, timeout=300)
        lost = [pod1.pid, *_children(pod1.pid)]
        assert len(lost) == 1 + int(config["WORKERS"])
        os.killpg(pod1.pid, signal.SIGKILL)
        for pid in lost[1:]:
            os.kill(pid, signal.SIGKILL)
        pod1.communicate(timeout=60)
        pod1 = start_pod(1)  # the Job's replacement pod
        for pod in (pod1, pod0):
            _, stderr = pod.communicate(timeout=600)
            assert pod.returncode == 0, stderr[-3000:]
        new = [r for r in train_runs() if r.info.run_id not in before]
        assert [r.info.run_id for r in new] == [run_id]  # pod 1 created none
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["nodes"] == "2"
        restarts = json.loads(run.data.tags[tags.RESTARTS])
        assert len(restarts) == 1 and restarts[0]["from_epoch"] == 2, restarts
        assert_same_training(metric_histories(jobs[2]), metric_histories(run_id))


def _every_rank_of(run_id: str, world: int = 2, timeout: float = 20) -> dict[int, int]:
    """The job's ranks, once all ``world`` of them are seen (one look at the processes can
    miss a rank: it happened once in a clean-clone run on two busy cores)."""
    def every_rank() -> dict[int, int]:
        ranks = ranks_of(run_id)
        return ranks if len(ranks) >= world else {}

    return wait_until(every_rank, timeout, f"all {world} ranks of run {run_id}", poll=0.1)


def _started_pipeline(folder: Path) -> subprocess.Popen:
    proc = start([os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "--env-manager",
                  "local", "-P", f"data_dir={folder}", "-P", "epochs=400", "-P", "workers=2"])
    wait_for_training(proc=proc)
    return proc


@pytest.mark.slow
def test_a_killed_rank_brings_the_pipeline_down_and_nothing_is_registered(tmp_path):
    with temporary_store(tmp_path):
        proc = _started_pipeline(write_idx_folder(tmp_path / "idx", n_train=2000))
        train = train_runs()[0]
        ranks = _every_rank_of(train.info.run_id)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - killed_at
        assert proc.returncode != 0
        assert took < 30, f"the pipeline took {took:.0f}s to stop"
        assert "rank 1 was killed by signal SIGKILL" in stderr
        assert_group_gone(proc.pid)
        assert ranks_of(train.info.run_id) == {}
        client = mlflow.MlflowClient()
        train = client.get_run(train.info.run_id)
        assert train.info.status == "FAILED"
        assert train.data.tags[tags.ENDED_BECAUSE] == "rank 1 was killed by signal SIGKILL"
        steps = {r.data.tags.get(tags.STEP) for r in client.search_runs(["0"])}
        assert "evaluate" not in steps and "register" not in steps
        assert client.search_model_versions() == []


@pytest.mark.slow
def test_ctrl_c_on_a_data_parallel_pipeline_leaves_train_killed(tmp_path):
    with temporary_store(tmp_path):
        proc = _started_pipeline(write_idx_folder(tmp_path / "idx", n_train=2000))
        train_id = train_runs()[0].info.run_id
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert_group_gone(proc.pid)
        assert ranks_of(train_id) == {}
        client = mlflow.MlflowClient()
        # main created the train run; it puts KILLED back over its launcher's FAILED
        # before it ends, so the status is final once the group is gone.
        assert client.get_run(train_id).info.status == "KILLED"
        assert client.search_model_versions() == []


@pytest.mark.slow
def test_a_taken_rendezvous_port_is_one_line_and_a_failed_run(tmp_path):
    import socket

    with temporary_store(tmp_path), socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        folder = write_idx_folder(tmp_path / "idx")
        assert run_step("download_data", "--data-dir", str(folder)).returncode == 0
        endpoint = f"127.0.0.1:{busy.getsockname()[1]}"
        result = run_step("train", "--nodes", "2", "--rdzv-endpoint", endpoint, timeout=120)
        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"could not start at rdzv_endpoint={endpoint}" in errors[0]
        assert "address already in use" in errors[0]
        run = train_runs()[0]
        assert run.info.status == "FAILED"
        assert "could not start" in run.data.tags[tags.ENDED_BECAUSE]


@pytest.mark.slow
def test_a_data_parallel_job_killed_midway_resumes_from_rank_0s_checkpoint(jobs):
    """The whole job SIGKILLed (a lost machine) after epoch 1, then continued with ``resume``:
    one run, every epoch logged once, the uninterrupted two-worker result."""
    with temporary_store(jobs["root"]):
        client = mlflow.MlflowClient()
        before = {r.info.run_id for r in train_runs()}
        # device=cpu, not main's default: main cannot take this run for one of its own.
        params = ["-P", f"epochs={EPOCHS}", "-P", "workers=2", "-P", "device=cpu", *ARCH]
        proc = start([os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "-e",
                      "train", "--env-manager", "local", "-P", f"data={jobs['data']}", *params])
        run_id = _new_train_run(before, proc, epoch=0)
        # The ranks are found before epoch 1 ends, not after: on an idle worker the last
        # epochs took less time than a search for them, and the job had ended when it ran.
        # They run in sessions of their own (torch's agent starts them so): a lost machine
        # takes the launcher's group and every rank at once.
        ranks = _every_rank_of(run_id, timeout=120)
        assert sorted(ranks) == [0, 1]
        wait_until(lambda: client.get_metric_history(run_id, "val_accuracy"), 180,
                   "the job's first epoch", poll=0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks.values():
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        assert_group_gone(proc.pid)
        wait_until(lambda: ranks_of(run_id) == {}, 30, "the killed ranks to be gone", poll=0.1)
        saved = json.loads(client.get_run(run_id).data.tags[tags.CHECKPOINT])["epoch"]
        assert 1 <= saved < EPOCHS
        result = mlflow_run("-e", "train", *params, "-P", f"resume={run_id}")
        assert result.returncode == 0, result.stderr[-3000:]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert json.loads(run.data.tags[tags.RESUMES])[0]["from_epoch"] == saved + 1
        assert_same_training(metric_histories(jobs[2]), metric_histories(run_id))


@pytest.mark.slow
def test_a_lost_agent_stops_its_ranks_and_its_run_is_continued_without_retraining(jobs):
    """SIGKILL to the train step's own process (torch's elastic agent; an OOM kill, a lost
    supervisor) during epoch 2: the ranks stop within 10 s (the kernel's parent-death
    signal), the tracking rank closes the run as interrupted with its checkpoint, and the
    next ``mlflow run .`` (main) continues that run to the uninterrupted result, no epoch
    trained twice (``resume=`` on a stopped run: the test above)."""
    from steps.tracking.runtime.runs import AGENT_LOST, ended

    with temporary_store(jobs["root"]):
        client = mlflow.MlflowClient()
        before = {r.info.run_id for r in train_runs()}
        # Only parameters main passes on, the others at their defaults: main can find it.
        params = ["-P", f"epochs={EPOCHS}", "-P", "workers=2", *ARCH]
        proc = start([os.path.join(VENV_BIN, "mlflow"), "run", str(PROJECT_DIR), "-e",
                      "train", "--env-manager", "local", "-P", f"data={jobs['data']}", *params])
        run_id = _new_train_run(before, proc, epoch=0)
        ranks = _every_rank_of(run_id, timeout=120)
        assert sorted(ranks) == [0, 1]
        # The ranks' parent: the train step's own `python -m steps.train`, under the launcher.
        agent = psutil.Process(ranks[0]).parent()
        assert "steps.train" in agent.cmdline() and agent.pid != proc.pid
        _new_train_run(before, proc, epoch=1)
        agent.kill()
        proc.communicate(timeout=60)
        wait_until(lambda: ranks_of(run_id) == {}, 10, "the ranks of the lost agent to stop",
                   poll=0.1)
        run = wait_until(lambda: (r := client.get_run(run_id)).data.tags.get(
            tags.ENDED_CAUSE) and r, 30, "the tracking rank to close the run")
        # MLflow's launcher may write FAILED, before or after the rank (its rule, as after
        # any interrupt of the run it launched); the run's own account says KILLED.
        assert (ended(run).status, ended(run).cause) == ("KILLED", AGENT_LOST)
        assert run.info.status in ("KILLED", "FAILED")
        saved = json.loads(run.data.tags[tags.CHECKPOINT])["epoch"]
        logged = [m.step for m in client.get_metric_history(run_id, "val_accuracy")]
        assert saved == max(logged) and 1 <= saved < EPOCHS  # nothing ran on unsupervised
        result = mlflow_run("-P", f"data_dir={jobs['folder']}", *params)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"main: train resumes run {run_id} at epoch " in result.stderr, result.stderr[-3000:]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [r.info.run_id for r in train_runs() if r.info.run_id not in before] == [run_id]
        assert_same_training(metric_histories(jobs[2]), metric_histories(run_id))


@pytest.mark.slow
def test_node_0s_lost_agent_stops_every_rank_of_both_nodes_and_closes_the_run(jobs):
    """Two manifest pods, restarts allowed (the manifest's MAX_RESTARTS): pod 0's agent
    SIGKILLed during epoch 2. Its rank stops by the parent-death signal and closes the run
    as interrupted with its checkpoint; pod 1, whose peer and rendezvous are gone, ends
    too, its rank with it: nothing trains on, and no restart starts a second run."""
    from steps.tracking.runtime.runs import AGENT_LOST, ended

    start_pod = _pod_starter(_multinode_config(), jobs["data"])
    with temporary_store(jobs["root"]):
        client = mlflow.MlflowClient()
        before = {r.info.run_id for r in train_runs()}
        pod1 = start_pod(1)
        pod0 = start_pod(0)
        run_id = _new_train_run(before, pod0, epoch=1, timeout=300)
        # Node 0's rank trains into the run (whichever global rank the rendezvous gave it);
        # pod 1's is its agent's child.
        (rank0,) = _every_rank_of(run_id, world=1).values()
        ranks = [psutil.Process(rank0), *(psutil.Process(p) for p in _children(pod1.pid))]
        assert len(ranks) == 2
        agent = ranks[0].parent()
        assert "steps.train" in agent.cmdline() and agent.pid != pod0.pid
        agent.kill()

        def training() -> list[int]:
            return [p.pid for p in ranks if p.is_running() and
                    p.status() != psutil.STATUS_ZOMBIE]

        wait_until(lambda: not training(), 10, "every rank of both nodes to stop", poll=0.1)
        for pod in (pod0, pod1):
            pod.communicate(timeout=120)
            assert pod.returncode != 0
        run = wait_until(lambda: (r := client.get_run(run_id)).data.tags.get(
            tags.ENDED_CAUSE) and r, 30, "the tracking rank to close the run")
        assert (ended(run).status, ended(run).cause) == ("KILLED", AGENT_LOST)
        saved = json.loads(run.data.tags[tags.CHECKPOINT])["epoch"]
        logged = [m.step for m in client.get_metric_history(run_id, "val_accuracy")]
        assert saved == max(logged) and 1 <= saved < EPOCHS
        assert [r.info.run_id for r in train_runs() if r.info.run_id not in before] == [run_id]
