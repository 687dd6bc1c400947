"""lm-eval's ``local-completions`` model (loglikelihood scoring through /v1/completions with echo+logprobs)
on the tiny multiple-choice task: through the gateway it scores every document as lm-eval's in-process HF
model does on the same version. And ``local-chat-completions`` (generation only) on a tiny generate-until
task: lm-eval records what the official openai client gets for the same messages."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from serve_helpers import install_monitor_standin, register_versions

pytest.importorskip("lm_eval")
install_monitor_standin()

FIXTURE = Path(__file__).parent / "fixtures" / "lmeval"


def per_doc(out, task):
    return {s["doc_id"]: float(s["acc"]) for s in out["samples"][task]}


def test_lmeval_local_completions_equals_in_process(tiny_model, tmp_path):
    import logging
    import warnings

    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from tuneloop.data.sources import hf_offline as offline
    from tuneloop.evaluate.lmeval import load_tasks
    from tuneloop.modeling import load_causal_lm, load_tokenizer
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    reg = register_versions(tmp_path / "ws", tiny_model, tmp_path, n_adapters=1, full=False)
    adapter = reg.open_artifact("tiny-bot", 1)
    spec = SimpleNamespace(name="lm", tasks=["tuneloop_tiny_mc"], include_path=str(FIXTURE), max_items=None)
    tasks = load_tasks(spec)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_causal_lm(str(tiny_model), adapter=str(adapter))
        hf = evaluator.evaluate(lm=HFLM(pretrained=model, tokenizer=load_tokenizer(str(adapter)), batch_size=4),
                                task_dict=tasks, log_samples=True)
        app = create_app(LocalBackend(reg, tmp_path / "ws"), Router(reg), GatewaySettings())
        with BackgroundServer(app) as server:
            api = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model="tiny-bot:1", tokenizer=str(adapter),
                                      tokenizer_backend="huggingface", num_concurrent=4, max_retries=1)
            via = evaluator.evaluate(lm=api, task_dict=load_tasks(spec), log_samples=True)
    task = "tuneloop_tiny_mc"
    assert per_doc(via, task) == per_doc(hf, task)
    assert via["results"][task]["acc,none"] == pytest.approx(hf["results"][task]["acc,none"])
    assert len(per_doc(via, task)) >= 5


def test_lmeval_local_chat_completions_through_the_gateway(tiny_model, tmp_path):
    """lm-eval's ``local-chat-completions`` model, unchanged, on a generate-until task: every document is
    answered, and lm-eval records exactly what the official openai client gets for the same messages."""
    import logging
    import warnings

    from lm_eval import evaluator
    from lm_eval.models.openai_completions import LocalChatCompletion
    from openai import OpenAI

    from tuneloop.data.sources import hf_offline as offline
    from tuneloop.evaluate.lmeval import load_tasks
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    reg = register_versions(tmp_path / "ws", tiny_model, tmp_path, n_adapters=1, full=False)
    spec = SimpleNamespace(name="lm", tasks=["tuneloop_tiny_gen"], include_path=str(FIXTURE), max_items=None)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    app = create_app(LocalBackend(reg, tmp_path / "ws"), Router(reg), GatewaySettings())
    with offline(), warnings.catch_warnings(), BackgroundServer(app) as server:
        warnings.simplefilter("ignore")
        api = LocalChatCompletion(base_url=f"{server.url}/v1/chat/completions", model="tiny-bot:1", num_concurrent=2,
                                  max_retries=1)
        out = evaluator.evaluate(lm=api, task_dict=load_tasks(spec), log_samples=True, apply_chat_template=True)
        client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        samples = out["samples"]["tuneloop_tiny_gen"]
        assert len(samples) == 6 and all(s["resps"][0][0] for s in samples)  # real answers, not empty ones
        for s in samples:
            question = f"Question: {s['doc']['question']}\nAnswer:"
            direct = client.chat.completions.create(model="tiny-bot:1", messages=[{"role": "user", "content": question}],
                                                    max_tokens=8, temperature=0, stop=["\n"])
            assert s["resps"][0][0] == (direct.choices[0].message.content or ""), s["doc"]["id"]
    assert "exact_match,none" in out["results"]["tuneloop_tiny_gen"]
