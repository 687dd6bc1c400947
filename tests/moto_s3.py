"""A real S3-compatible server on loopback for the object-store tests: moto in server mode (HTTP on 127.0.0.1, a
free port), started by the fixture and stopped after. The fixture points the standard AWS environment at it
(``AWS_ENDPOINT_URL``, dummy keys, a region) for its module and restores the environment after.

``s3_server`` yields the endpoint URL; :func:`upload` copies a local file or directory to an ``s3://`` URL;
:func:`require_auth` switches moto's credential check on (every request is then refused: the dummy keys are
not known to its IAM) and off again."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BUCKET = "tuneloop-data"
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra has it)")
    pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'tuneloop[s3]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log lines
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*_ENV, *_CLEARED, "AWS_ENDPOINT_URL")}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
    for k in _CLEARED:
        os.environ.pop(k, None)
    try:
        from tuneloop.data.objstore import filesystem

        filesystem(f"s3://{BUCKET}").mkdir(BUCKET)
        yield endpoint
    finally:
        _post(endpoint, "reset", "")  # moto's state is per process: the next module's server starts empty
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(local: Path, url: str) -> str:
    """Copy a file, or a directory's files (relative names kept), to ``url``; return ``url``."""
    from tuneloop.data.objstore import filesystem

    fs = filesystem(url)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for p in files:
        target = url if local.is_file() else f"{url.rstrip('/')}/{p.relative_to(local).as_posix()}"
        fs.pipe_file(target, p.read_bytes())
    return url


@contextmanager
def require_auth(endpoint: str) -> Iterator[None]:
    """moto checks credentials inside the block (its IAM knows no keys, so every request is denied)."""

    _post(endpoint, "reset-auth", "0")
    try:
        yield
    finally:
        _post(endpoint, "reset-auth", "inf")


def _post(endpoint: str, action: str, body: str) -> None:
    req = urllib.request.Request(
        f"{endpoint}/moto-api/{action}",
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},  # a form body would be parsed away by the server
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        json.load(r)
