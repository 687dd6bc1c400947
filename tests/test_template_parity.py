"""Train and serve see the same prompt: a conversation rendered by training's preprocessing
(``data.formats`` normalises it, ``data.prepare.tokenize_conversation`` tokenizes it) and the same conversation
sent to the gateway (``serve.backends.local.chat_prompt_ids``, what ``/v1/chat/completions`` feeds the model)
are the same token ids up to each assistant answer: with a system turn, several turns, tool-call turns and
Chinese; for the real model's own chat template and for ours (``modeling.CHATML_TEMPLATE``).

The serving tokenizer is the one the gateway loads: the training tokenizer after the trip preprocessing ->
training -> registered artifact (``save_tokenizer`` / ``load_tokenizer`` twice)."""

from __future__ import annotations

import json

import pytest

from serve_helpers import install_monitor_standin, register_versions

install_monitor_standin()

WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "C"})},
}
CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "You are a support bot for Acme. Answer in one sentence."},
        {"role": "user", "content": "My parcel is late."},
        {"role": "assistant", "content": "I am sorry; I will check the tracking number for you."},
    ],
    "multi_turn": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  And 3 + 3?\n\n"},
        {"role": "assistant", "content": "\n6 "},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ],
    "chinese": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好，你叫什么名字？"},
        {"role": "assistant", "content": "我叫小明，是 Acme 的助手。"},
        {"role": "user", "content": "你来自哪里？请用一句话回答🙂"},
        {"role": "assistant", "content": "我来自北京。"},
    ],
    "tool_calls": [
        {"role": "developer", "content": "Use the tools when you need live data."},
        {"role": "user", "content": "What is the weather in Paris and in 東京?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                WEATHER_CALL,
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "東京"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 9}'},
        {"role": "assistant", "content": "Paris: 21 °C; 東京: 9 °C."},
        {"role": "user", "content": "And tomorrow in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
        {"role": "function", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "18 °C tomorrow."},
    ],
}


def training_ids(tok, openai_messages) -> tuple[list[int], list[int]]:
    """(input_ids, start of each assistant answer) as preprocessing tokenizes the record for training."""
    from tuneloop.data.formats import normalise, sft_messages
    from tuneloop.data.prepare import IGNORE_INDEX, tokenize_conversation

    record, reasons = normalise({"messages": openai_messages}, "messages")
    assert record is not None, reasons
    ex = tokenize_conversation(tok, sft_messages(record), max_length=4096)
    labels = ex["labels"]
    starts = [i for i, x in enumerate(labels) if x != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]
    return ex["input_ids"], starts


def serving_ids(tok, openai_messages) -> list[int]:
    """The prompt ids the gateway builds for a chat request of these messages."""
    from tuneloop.serve.backends.local import chat_prompt_ids
    from tuneloop.serve.schemas import ChatRequest

    return chat_prompt_ids(tok, ChatRequest(model="m", messages=openai_messages).messages)


def round_trip(tok, tmp_path, template: str | None):
    """The tokenizer as the gateway loads it: saved by preprocessing, loaded by training, saved into the
    artifact, loaded by the gateway with the config's chat template."""
    from tuneloop.modeling import load_tokenizer, save_tokenizer

    save_tokenizer(tok, tmp_path / "prep")
    save_tokenizer(load_tokenizer(str(tmp_path / "prep")), tmp_path / "artifact")
    return load_tokenizer(str(tmp_path / "artifact"), template)


def assert_parity(train_tok, serve_tok, name: str) -> None:
    messages = CONVERSATIONS[name]
    ids, starts = training_ids(train_tok, messages)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(starts) == len(answers), f"{name}: every assistant turn is trained on"
    for turn, start in zip(answers, starts, strict=True):
        served = serving_ids(serve_tok, messages[:turn])
        if served != ids[:start]:
            at = next((i for i, (a, b) in enumerate(zip(served, ids, strict=False)) if a != b), min(len(served), start))
            pytest.fail(
                f"{name}, answer at message {turn}: the gateway's prompt differs from training's at token {at}:\n"
                f"  training: {train_tok.decode(ids[max(0, at - 8) : start])!r}\n"
                f"  gateway:  {serve_tok.decode(served[max(0, at - 8) :])!r}"
            )


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tiny_model_chatml_template(tiny_model, tmp_path, name):
    from tuneloop.modeling import CHATML_TEMPLATE, load_tokenizer

    tok = load_tokenizer(str(tiny_model), None)
    assert tok.chat_template == CHATML_TEMPLATE
    assert_parity(tok, round_trip(tok, tmp_path, None), name)


@pytest.mark.real_model
@pytest.mark.parametrize("template", ["own", "chatml"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_real_model_templates(real_model_dir, tmp_path, name, template):
    from tuneloop.modeling import CHATML_TEMPLATE, load_tokenizer

    chat_template = CHATML_TEMPLATE if template == "chatml" else None
    tok = load_tokenizer(str(real_model_dir), chat_template)
    if template == "own":
        assert "SmolLM" in tok.chat_template  # its own template (adds a default system turn), not ours
    assert_parity(tok, round_trip(tok, tmp_path, chat_template), name)


def test_gateway_serves_tool_turns_with_the_training_prompt(tiny_model, tmp_path):
    """Through HTTP: a conversation with tool-call turns is answered (it used to be a 400), and the prompt the
    gateway counts is the training prompt's length; offering ``tools`` stays a clear 400."""
    import httpx

    from tuneloop.modeling import load_tokenizer
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    reg = register_versions(tmp_path / "ws", tiny_model, tmp_path, n_adapters=0, full=True)
    messages = CONVERSATIONS["tool_calls"]
    ids, starts = training_ids(load_tokenizer(str(tiny_model)), messages)
    with BackgroundServer(create_app(LocalBackend(reg, tmp_path / "ws"), Router(reg), GatewaySettings())) as server:
        # up to the answer after the two tool results (the whole conversation is too long for the tiny model)
        body = {"model": "tiny-bot:1", "messages": messages[:5], "max_tokens": 2, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == starts[1]
        bad = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=60,
            json={**body, "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"
        nameless = [
            *messages[:2],
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
        ]
        bad = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "messages": nameless}, timeout=60)
        assert bad.status_code == 400 and "no function name" in bad.json()["error"]["message"]
