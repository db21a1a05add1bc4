"""The test machinery itself, where a flaw would show up as a flaky test elsewhere."""

from __future__ import annotations

import os
import signal
import socket
import sys

import pytest

from helpers import processes


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
    with pytest.raises(AssertionError, match="never answered"):
        processes.start_listening(
            lambda port: [sys.executable, "-c", "raise SystemExit('no store here')"],
            tmp_path / "log", "/", cwd=tmp_path)
    assert len(tried) == 1
