"""Known-answer probes on a version registered by a real pipeline run: it reproduces its own evaluation
answers and is served; a recorded answer that the weights do not reproduce refuses the version."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve_helpers import install_monitor_standin

install_monitor_standin()


@pytest.mark.slow
def test_probes_pass_on_the_registered_version_and_refuse_a_mismatch(make_config):
    from tuneloop.config import load_config
    from tuneloop.pipeline import FineTunePipeline
    from tuneloop.registry.api import open_registry
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.errors import APIError
    from tuneloop.workspace import Workspace

    cfg = load_config(make_config())
    summary = FineTunePipeline(cfg).run()
    assert summary["overall"] == "passed", summary
    ws = Workspace.for_config(cfg).root
    reg = open_registry(cfg, ws)
    version = reg.get(cfg.model_name, "latest")
    backend = LocalBackend(reg, ws)
    status = asyncio.run(backend.prepare(version))
    assert status["status"] == "passed" and status["probes"] >= 2
    asyncio.run(backend.close())

    items = ws / "runs" / version.lineage["run_id"] / "eval_items.jsonl"
    recs = [json.loads(x) for x in items.read_text().splitlines()]
    for r in recs:
        if isinstance(r.get("candidate"), str):
            r["candidate"] = "an answer this model never gave"
    items.write_text("".join(json.dumps(r) + "\n" for r in recs))
    backend = LocalBackend(reg, ws)
    with pytest.raises(APIError) as exc:
        asyncio.run(backend.prepare(version))
    assert exc.value.status == 503 and exc.value.code == "version_refused"
    assert "known-answer probe" in exc.value.message and "an answer this model never gave" in exc.value.message
    asyncio.run(backend.close())
