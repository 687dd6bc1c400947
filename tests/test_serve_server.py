"""The gateway as a process: serve() on a workspace, SIGTERM with a request in flight, and refusals before binding."""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import pytest

from serve_helpers import free_port, install_monitor_standin, register_versions, sse_events, start_gateway_process

install_monitor_standin()


@pytest.fixture(scope="module")
def workspace(tiny_model, tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws-proc")
    register_versions(ws, tiny_model, tmp_path_factory.mktemp("arts-proc"), n_adapters=1, full=False)
    return ws


@pytest.mark.slow
def test_sigterm_finishes_in_flight_then_exits(workspace):
    port = free_port()
    proc = start_gateway_process(workspace, port)
    try:
        got = {}

        def stream():
            body = {
                "model": "tiny-bot",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 150,
                "temperature": 0,
                "stream": True,
            }
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
            got["events"] = sse_events(r.text)

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        t.join(30)
        assert rc == 0
        assert time.monotonic() - t0 < 15  # within serve.shutdown_grace_s (10 s) and the model's unload
        assert got["events"][-1] == "[DONE]"  # the in-flight stream was finished, not cut
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_port_in_use_before_loading(workspace):
    from tuneloop.errors import InputError
    from tuneloop.serve.server import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(InputError, match="already in use"):
            serve(workspace, "127.0.0.1", port)
        assert time.monotonic() - t0 < 2


def test_serve_torch_threads_sets_torch_threads_for_the_local_backend(tmp_path):
    import torch

    from tuneloop.config import ServeConfig
    from tuneloop.registry.sqlite import SqliteRegistry
    from tuneloop.serve.server import make_backend

    before = torch.get_num_threads()
    try:
        make_backend(ServeConfig(torch_threads=1), SqliteRegistry(tmp_path), tmp_path, None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    make_backend(ServeConfig(), SqliteRegistry(tmp_path), tmp_path, None)
    assert torch.get_num_threads() == before  # unset: torch's own choice is left alone
    with pytest.raises(Exception, match="torch_threads"):
        ServeConfig(torch_threads=0)
