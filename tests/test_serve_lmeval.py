"""lm-eval's ``local-completions`` model (loglikelihood scoring through /v1/completions with echo+logprobs)
on the tiny multiple-choice task: through the gateway it scores every document as lm-eval's in-process HF
model does on the same version. And ``local-chat-completions`` (generation only) on a tiny generate-until
task: lm-eval records what the official openai client gets for the same messages. And on a trained model (the
demo's shipped base) with a task after whose answers the model's next token is its EOS: /v1/completions returns
that token with its logprob, so lm-eval's scores through the gateway equal its in-process ones."""

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
        hf = evaluator.evaluate(
            lm=HFLM(pretrained=model, tokenizer=load_tokenizer(str(adapter)), batch_size=4),
            task_dict=tasks,
            log_samples=True,
        )
        app = create_app(LocalBackend(reg, tmp_path / "ws"), Router(reg), GatewaySettings())
        with BackgroundServer(app) as server:
            api = LocalCompletionsAPI(
                base_url=f"{server.url}/v1/completions",
                model="tiny-bot:1",
                tokenizer=str(adapter),
                tokenizer_backend="huggingface",
                num_concurrent=4,
                max_retries=1,
            )
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
        api = LocalChatCompletion(
            base_url=f"{server.url}/v1/chat/completions", model="tiny-bot:1", num_concurrent=2, max_retries=1
        )
        out = evaluator.evaluate(lm=api, task_dict=load_tasks(spec), log_samples=True, apply_chat_template=True)
        client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        samples = out["samples"]["tuneloop_tiny_gen"]
        assert len(samples) == 6 and all(s["resps"][0][0] for s in samples)  # real answers, not empty ones
        for s in samples:
            question = f"Question: {s['doc']['question']}\nAnswer:"
            direct = client.chat.completions.create(
                model="tiny-bot:1",
                messages=[{"role": "user", "content": question}],
                max_tokens=8,
                temperature=0,
                stop=["\n"],
            )
            assert s["resps"][0][0] == (direct.choices[0].message.content or ""), s["doc"]["id"]
    assert "exact_match,none" in out["results"]["tuneloop_tiny_gen"]


# ------------------------------------------------------------------------- the end-of-sequence token
# lm-eval's local-completions scores a continuation with `max_tokens: 1, echo: true, logprobs: 1` and drops the
# LAST returned logprob as the generated token. When the model's next token is its end-of-sequence token, the
# gateway must return that token (as OpenAI and vLLM do), or lm-eval drops a continuation token instead. A
# trained model makes EOS the likely next token: the demo's shipped base, pretrained on ChatML chats with
# one-word answers, asked in its own chat format.

DEMO_CHAT_MC = "tuneloop_demo_chat_mc"


def demo_registry(tmp_path):
    from tuneloop.demo.base_model import SHIPPED_BASE_DIR
    from tuneloop.registry.sqlite import SqliteRegistry

    reg = SqliteRegistry(tmp_path / "ws")
    reg.register(
        "demo",
        SHIPPED_BASE_DIR,
        artifact_kind="model",
        base_model=str(SHIPPED_BASE_DIR),
        lineage={},
        metrics={},
        gates={},
    )
    return reg, SHIPPED_BASE_DIR


def demo_gateway(reg, tmp_path):
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    return BackgroundServer(create_app(LocalBackend(reg, tmp_path / "ws"), Router(reg), GatewaySettings()))


def test_completions_echo_returns_the_end_of_sequence_token(tmp_path):
    import httpx
    import torch

    from tuneloop.modeling import load_causal_lm, load_tokenizer

    reg, base = demo_registry(tmp_path)
    tok, model = load_tokenizer(str(base)), load_causal_lm(str(base))
    ids = tok(
        "<|im_start|>user\nWhat colour is the red lamp?<|im_end|>\n<|im_start|>assistant\nred", add_special_tokens=False
    )["input_ids"]
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert int(lp[-1].argmax()) == tok.eos_token_id  # the trained model's next token is <|im_end|>
    prompt_lps = [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    eos_lp = float(lp[-1, tok.eos_token_id])
    with demo_gateway(reg, tmp_path) as server:
        body = {"model": "demo:1", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        out = choice["logprobs"]
        assert len(out["tokens"]) == len(ids) + 1 and out["tokens"][-1] == "<|im_end|>"  # the generated token
        assert out["token_logprobs"][0] is None
        assert out["token_logprobs"][1:-1] == pytest.approx(prompt_lps, abs=1e-4)
        assert out["token_logprobs"][-1] == pytest.approx(eos_lp, abs=1e-4)
        assert out["top_logprobs"][-1] == pytest.approx({"<|im_end|>": eos_lp}, abs=1e-4)
        assert choice["finish_reason"] == "stop" and choice["text"] == tok.decode(ids)  # its text is not in `text`
        plain = httpx.post(
            f"{server.url}/v1/completions",
            timeout=60,
            json={"model": "demo:1", "prompt": ids, "max_tokens": 4, "logprobs": 0, "temperature": 0},
        ).json()["choices"][0]
        assert plain["text"] == "" and plain["logprobs"]["tokens"] == ["<|im_end|>"]
        assert plain["logprobs"]["token_logprobs"] == pytest.approx([eos_lp], abs=1e-4)


def test_lmeval_local_completions_equals_in_process_on_a_trained_model(tmp_path):
    """lm-eval's local-completions through the gateway scores every document as lm-eval's in-process HF model
    does -- on a trained model and a task where the model's next token after an answer is its EOS."""
    import logging
    import warnings

    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from tuneloop.data.sources import hf_offline as offline
    from tuneloop.evaluate.lmeval import load_tasks
    from tuneloop.modeling import load_causal_lm, load_tokenizer

    reg, base = demo_registry(tmp_path)
    spec = SimpleNamespace(name="lm", tasks=[DEMO_CHAT_MC], include_path=str(FIXTURE), max_items=None)
    tok, model = load_tokenizer(str(base)), load_causal_lm(str(base))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = evaluator.evaluate(
            lm=HFLM(pretrained=model, tokenizer=tok, batch_size=4), task_dict=load_tasks(spec), log_samples=True
        )
        with demo_gateway(reg, tmp_path) as server:
            api = LocalCompletionsAPI(
                base_url=f"{server.url}/v1/completions",
                model="demo:1",
                tokenizer=str(base),
                tokenizer_backend="huggingface",
                num_concurrent=4,
                max_retries=1,
            )
            via = evaluator.evaluate(lm=api, task_dict=load_tasks(spec), log_samples=True)
    # the task does what it is for: after most right answers the model's next token is <|im_end|>
    samples = hf["samples"][DEMO_CHAT_MC]
    eos_next = 0
    with torch.inference_mode():
        for s in samples:
            text = s["arguments"][s["target"]][0] + s["arguments"][s["target"]][1]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            eos_next += int(model(torch.tensor([ids])).logits[0, -1].argmax()) == tok.eos_token_id
    print(
        f"EOS follows the right answer in {eos_next} of {len(samples)} documents; "
        f"acc {hf['results'][DEMO_CHAT_MC]['acc,none']:.4f} (HF) {via['results'][DEMO_CHAT_MC]['acc,none']:.4f} (gateway)"
    )
    assert eos_next >= len(samples) // 2, f"EOS follows the right answer in only {eos_next} of {len(samples)} documents"
    # document by document: the same accuracy, and the same loglikelihood of every choice
    assert per_doc(via, DEMO_CHAT_MC) == per_doc(hf, DEMO_CHAT_MC)
    lls = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in via["samples"][DEMO_CHAT_MC]}
    for s in samples:
        assert lls[s["doc_id"]] == pytest.approx([r[0] for r in s["filtered_resps"]], abs=1e-3), s["doc"]["id"]
    assert via["results"][DEMO_CHAT_MC]["acc,none"] == pytest.approx(hf["results"][DEMO_CHAT_MC]["acc,none"])
