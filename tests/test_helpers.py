"""The test machinery itself, where a flaw would show up as a flaky test elsewhere."""

from __future__ import annotations

import os
import signal
import socket
import sys
from types import SimpleNamespace

import pytest

from helpers import processes, scheduling


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]


def test_a_server_that_loses_its_port_to_another_process_starts_on_another(tmp_path,
                                                                          monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy, processes.free_port()])
        monkeypatch.setattr(processes, "free_port", lambda: next(ports))
        server, port = processes.start_listening(http_server, tmp_path / "log", "/",
                                                 cwd=tmp_path)
        os.killpg(server.pid, signal.SIGKILL)  # what it does on SIGTERM is not the point
        server.wait(timeout=30)
    assert port != busy


def test_a_server_that_dies_for_another_reason_is_not_retried(tmp_path, monkeypatch):
    tried = []
    monkeypatch.setattr(processes, "free_port", lambda: tried.append(1) or 1)
    with pytest.raises(AssertionError, match=r"(?s)to answer: exit 1.*no store here"):
        processes.start_listening(
            lambda port: [sys.executable, "-c", "raise SystemExit('no store here')"],
            tmp_path / "log", "/", cwd=tmp_path)
    assert len(tried) == 1


def test_test_files_are_handed_out_longest_first_and_unknown_ones_before_all():
    nodeids = ["tests/test_a.py::one", "tests/test_b.py::one", "tests/test_a.py::two",
               "tests/test_new.py::one", "tests/test_c.py::one"]
    durations = {"tests/test_a.py": 10.0, "tests/test_b.py": 300.0, "tests/test_c.py": 50.0}
    order = [nodeids[i] for i in scheduling.longest_files_first(nodeids, durations)]
    assert order == ["tests/test_new.py::one", "tests/test_b.py::one", "tests/test_c.py::one",
                     "tests/test_a.py::one", "tests/test_a.py::two"]


def test_stored_durations_are_each_files_seconds_and_files_not_run_keep_theirs(tmp_path):
    (tmp_path / "durations.json").write_text('{"tests/test_c.py": 9.0, "tests/test_a.py": 99}')
    log = scheduling.DurationLog(tmp_path / "durations.json")
    for nodeid, seconds in (("tests/test_a.py::one", 1.5), ("tests/test_a.py::two", 2.0),
                            ("tests/test_b.py::one", 7.25)):
        log.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, duration=seconds))
    log.pytest_sessionfinish(session=None)
    assert scheduling.read_durations(tmp_path / "durations.json") == {
        "tests/test_c.py": 9.0, "tests/test_b.py": 7.2, "tests/test_a.py": 3.5}
    assert scheduling.read_durations(tmp_path / "missing.json") == {}
