"""Preprocessing: chat template rendering and loss masking on the real tokenizer of the tiny model."""

from __future__ import annotations

from tuneloop.data.prepare import IGNORE_INDEX, tokenize_conversation
from tuneloop.modeling import CHATML_TEMPLATE, load_tokenizer

CONV = [
    {"role": "system", "content": "Route the ticket."},
    {"role": "user", "content": "Where is my parcel?"},
    {"role": "assistant", "content": "shipping"},
    {"role": "user", "content": "And my money back?"},
    {"role": "assistant", "content": "refund"},
]


def _trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX])


def test_only_assistant_turns_carry_loss(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    ex = tokenize_conversation(tok, CONV, max_length=512)
    assert _trained_text(tok, ex) == "shipping<|im_end|>\nrefund<|im_end|>\n"
    full = tok.apply_chat_template(CONV, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full and not ex["truncated"]
    everything = tokenize_conversation(tok, CONV, max_length=512, train_on_inputs=True)
    assert all(lab != IGNORE_INDEX for lab in everything["labels"])


def test_truncation_is_reported(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    ex = tokenize_conversation(tok, CONV, max_length=8)
    assert ex["truncated"] and len(ex["input_ids"]) == 8


def test_tokenizer_without_template_gets_chatml(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model))
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    again = load_tokenizer(str(tmp_path))
    assert again.chat_template == CHATML_TEMPLATE
    rendered = again.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert (
        rendered
        == "<|im_start|>system\nRoute the ticket.<|im_end|>\n<|im_start|>user\nWhere is my parcel?<|im_end|>\n<|im_start|>assistant\n"
    )
