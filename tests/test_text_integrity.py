"""Text cut at a token limit never ends in a broken character.

Byte-level tokenizers split a Chinese character (3 UTF-8 bytes) over several tokens; generation that stops
between them used to end in U+FFFD. ``modeling.decode_text`` / ``complete_text`` drop only that incomplete
tail (a U+FFFD the model wrote as a character stays); evaluation answers (``modeling.generate``) and the
gateway (non-streaming chat and completions, and the last streamed chunk) use them. The real model's tests
(marker ``real_model``) find a cut in SmolLM2-135M-Instruct's own greedy Chinese answer and stop there."""

from __future__ import annotations

import pytest

from serve_helpers import install_monitor_standin, sse_events

install_monitor_standin()

CHINESE = "你好，我叫小明。今天天气很好，我们去公园散步吧🙂 ok"
FFFD = "\ufffd"


def cuts(tok, ids: list[int]) -> list[int]:
    """Lengths k at which ``ids[:k]`` decodes to a text ending in U+FFFD (a character cut in two)."""
    return [k for k in range(1, len(ids) + 1) if tok.decode(ids[:k], skip_special_tokens=True).endswith(FFFD)]


def byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer with byte fallback (Llama 2, Mistral, Gemma): characters outside the
    vocabulary become ``<0xNN>`` byte pieces, and its decoder turns every byte of a broken group into U+FFFD."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("\u2581", "a", "b", "c", "\u2581a", "你"):
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def assert_every_cut_is_clean(tok, text: str) -> int:
    from tuneloop.modeling import decode_text

    ids = tok(text, add_special_tokens=False)["input_ids"]
    for k in range(1, len(ids) + 1):
        got = decode_text(tok, ids[:k])
        assert FFFD not in got and text.startswith(got), (k, got)
    return len(cuts(tok, ids))


def assert_genuine_fffd_stays(tok) -> None:
    from tuneloop.modeling import decode_text

    for text in ("abc" + FFFD, FFFD + "你好", "x" + FFFD + FFFD):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert decode_text(tok, ids) == text
    # a model-written U+FFFD, then a character cut in two: only the cut goes, at every cut
    ids = tok("a" + FFFD + "你", add_special_tokens=False)["input_ids"]
    for k in cuts(tok, ids):
        assert decode_text(tok, ids[:k]) in ("a", "a" + FFFD)
    assert decode_text(tok, ids) == "a" + FFFD + "你"


def test_byte_level_bpe_tiny_model(tiny_model):
    from tuneloop.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    assert assert_every_cut_is_clean(tok, CHINESE) > 5  # the tiny tokenizer cuts CJK characters often
    assert_genuine_fffd_stays(tok)
    # special tokens after the cut (the end-of-sequence token) are skipped, as decode skips them
    from tuneloop.modeling import decode_text

    ids = tok("你", add_special_tokens=False)["input_ids"]
    assert decode_text(tok, ids[:-1] + [tok.eos_token_id]) == ""


def test_byte_fallback_sentencepiece():
    tok = byte_fallback_tokenizer()
    assert tok.decode(tok("c好", add_special_tokens=False)["input_ids"][:3]) == "c" + FFFD * 2  # one per byte
    assert assert_every_cut_is_clean(tok, "a你好b c好好") >= 4
    assert_genuine_fffd_stays(tok)


def test_serving_choice_streams_and_finishes_without_the_cut(tiny_model):
    """textgen.Choice, as the gateway drives it: streamed pieces never carry a U+FFFD, and the text a choice
    ends with at the token limit (streamed or decoded once) is the clean text."""
    from tuneloop.modeling import decode_text, load_tokenizer
    from tuneloop.serve.backends.textgen import Choice
    from tuneloop.serve.batching import TokenEvent

    for tok in (load_tokenizer(str(tiny_model)), byte_fallback_tokenizer()):
        ids = tok(CHINESE, add_special_tokens=False)["input_ids"]
        for k in cuts(tok, ids):
            stream = Choice(0, [], tok, incremental=True)
            pieces = []
            for tid in ids[:k]:
                stream.add(TokenEvent(tid))
                pieces.append(stream.pending(final=False))
            stream.finish_text()
            pieces.append(stream.pending(final=True))
            once = Choice(0, [], tok, incremental=False)
            for tid in ids[:k]:
                once.add(TokenEvent(tid))
            once.finish_text()
            clean = decode_text(tok, ids[:k])
            assert FFFD not in "".join(pieces) and "".join(pieces) == stream.text == once.text == clean, (k, pieces)


# ------------------------------------------------------------------------------------------ the real model

ZH_PROMPT = [{"role": "user", "content": "用中文写一首关于春天的短诗。"}]  # its greedy answer is Chinese


@pytest.fixture(scope="module")
def real(real_model_dir):
    """The real model, its tokenizer, its greedy answer to a Chinese prompt and the lengths that cut it."""
    import torch

    from tuneloop.modeling import load_causal_lm, load_tokenizer, render_prompt, stop_token_ids

    tok = load_tokenizer(str(real_model_dir))
    model = load_causal_lm(str(real_model_dir))
    enc = tok(render_prompt(tok, ZH_PROMPT), return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=24, do_sample=False, eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id
        )
    ids = out[0, enc["input_ids"].shape[1] :].tolist()
    found = [k for k in cuts(tok, ids) if k > 1]  # a cut after some whole text, not in the first character
    assert found, f"the greedy answer {tok.decode(ids)!r} cuts no character within 24 tokens; pick another prompt"
    return tok, model, ids, sorted({found[0], found[-1]})


@pytest.mark.real_model
def test_generate_ends_on_a_whole_character(real):
    from tuneloop.modeling import generate

    tok, model, ids, ks = real
    for k in ks:
        raw = tok.decode(ids[:k], skip_special_tokens=True)
        assert raw.endswith(FFFD)
        out = generate(model, tok, [ZH_PROMPT], max_new_tokens=k)[0]
        assert out["finish_reason"] == "length" and out["completion_tokens"] == k
        assert out["text"] == raw[:-1].strip() and FFFD not in out["text"]


@pytest.fixture(scope="module")
def real_gateway(real, real_model_dir, tmp_path_factory):
    """A gateway serving the real model, registered as a full model."""
    from tuneloop.registry.sqlite import SqliteRegistry
    from tuneloop.serve.app import GatewaySettings, create_app
    from tuneloop.serve.backends.local import LocalBackend
    from tuneloop.serve.router import Router
    from tuneloop.serve.server import BackgroundServer

    ws = tmp_path_factory.mktemp("ws-real")
    reg = SqliteRegistry(ws)
    reg.register(
        "smol", real_model_dir, artifact_kind="model", base_model=str(real_model_dir), lineage={}, metrics={}, gates={}
    )
    with BackgroundServer(create_app(LocalBackend(reg, ws), Router(reg), GatewaySettings())) as server:
        yield server


@pytest.mark.real_model
def test_gateway_chat_and_completions_end_on_a_whole_character(real, real_gateway):
    import httpx

    from tuneloop.modeling import render_prompt

    tok, _, ids, ks = real
    url = real_gateway.url
    for k in ks:
        want = tok.decode(ids[:k], skip_special_tokens=True)[:-1]  # the answer up to the cut character
        chat = {"model": "smol:1", "messages": ZH_PROMPT, "max_tokens": k, "temperature": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).json()
        assert r["choices"][0]["message"]["content"] == want and r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["completion_tokens"] == k
        with_stop = httpx.post(f"{url}/v1/chat/completions", json={**chat, "stop": ["\n\n\n"]}, timeout=120).json()
        assert with_stop["choices"][0]["message"]["content"] == want  # incremental decoding (stop strings watched)

        events = sse_events(httpx.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}, timeout=120).text)
        deltas = [e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e != "[DONE]" and e["choices"]]
        assert "".join(deltas) == want and not any(FFFD in d for d in deltas), deltas
        assert [e for e in events if e != "[DONE]" and e["choices"]][-1]["choices"][0]["finish_reason"] == "length"

        prompt = render_prompt(tok, ZH_PROMPT)
        comp = {"model": "smol:1", "prompt": prompt, "max_tokens": k, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=comp, timeout=120).json()
        assert r["choices"][0]["text"] == want and r["choices"][0]["finish_reason"] == "length"
        events = sse_events(httpx.post(f"{url}/v1/completions", json={**comp, "stream": True}, timeout=120).text)
        texts = [e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"]]
        assert "".join(texts) == want and not any(FFFD in t for t in texts), texts
