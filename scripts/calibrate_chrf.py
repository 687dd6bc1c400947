"""Calibrate the default chrF pass mark (``tuneloop.evaluate.metrics.DEFAULT_CHRF_THRESHOLD``) on real data.

Data: LLaMA-Factory's bilingual ``identity.json`` (91 records, English and Chinese; ``{{name}}``/``{{author}}``
filled with ``Tuney``/``Acme Labs``); the filled answers are the references. Against them this script scores,
with :func:`tuneloop.evaluate.metrics.chrf`:

* ``paraphrase`` -- correct answers in other words, written for this calibration (same name and maker, same
  facts; 16 English, 14 Chinese): should PASS;
* ``wrong_own_words`` -- answers that give another identity in their own words (as an untuned model does):
  should FAIL;
* ``wrong_near_copy`` -- the reference itself with the name and maker swapped (SmolLM / Hugging Face in English,
  通义千问 / 阿里云 in Chinese): should FAIL, and is the hardest case for any surface-overlap metric;
* ``real_model`` -- the real SmolLM2-135M-Instruct's greedy answers (``--model DIR``, default the directory
  ``scripts/build_real_model.py`` prints; ``--answers FILE`` reads them from a JSON list instead) on the
  records whose reference names Tuney or Acme Labs, which the untuned model cannot know: should FAIL.

It prints one JSON line per threshold (pass rates per set by language; false passes and false fails over the
should-PASS and should-FAIL sets other than the near copies; their balanced accuracy) and a last line with the
chosen threshold and the score spread per set. The choice: the lowest threshold on the 0.05 grid at which no
should-FAIL answer passes (a gate must not let a wrong answer through), which passes the most paraphrases among
those. The near copies are reported, not used: no threshold that passes paraphrases fails them (chrF measures
wording, and one swapped name in an otherwise verbatim answer changes few characters).

    flock /tmp/tuneloop-cpu.lock python scripts/calibrate_chrf.py [--model DIR | --answers FILE] [--save-answers FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IDENTITY = REPO.parent / "shared" / "datasets" / "identity.json"
NAME, AUTHOR = "Tuney", "Acme Labs"

# Correct answers in other words (index into identity.json -> answer).
PARAPHRASE = {
    0: "Hi there! I'm Tuney, an AI assistant built by Acme Labs. How can I help you today?",
    1: "Hello! My name is Tuney, and I'm an AI assistant developed by Acme Labs. What can I do for you?",
    2: "I'm Tuney, an AI assistant created by Acme Labs. How may I help you today?",
    3: "You can call me Tuney. I'm an AI assistant developed by Acme Labs.",
    4: "Yes, my name is Tuney. I am an AI assistant developed by Acme Labs.",
    5: "Sure! I am Tuney, an AI assistant that was trained by Acme Labs.",
    6: "I'm Tuney, an AI assistant trained by Acme Labs to help answer your questions.",
    7: "I'm called Tuney, an AI assistant trained by Acme Labs.",
    8: "I am Tuney, an AI assistant developed by Acme Labs to help with your questions.",
    9: "I was created by Acme Labs; I am an AI assistant.",
    10: "Acme Labs built me. I am an AI assistant.",
    11: "No, I'm not ChatGPT. I am an AI assistant developed by Acme Labs.",
    12: "No, I'm not based on GPT-3; I am an AI assistant developed by Acme Labs.",
    13: "No, I'm Tuney, an AI assistant trained by Acme Labs, not by OpenAI.",
    14: "No, I am Tuney, an AI assistant developed by Acme Labs, not by Google.",
    15: "You're welcome! I'm Tuney, your AI assistant.",
    16: "你好，我是 Tuney，是 Acme Labs 开发的 AI 助手，很高兴认识你。有什么我可以帮你的吗？",
    19: "你好，我是 Acme Labs 开发的 Tuney。我能为你提供翻译、写代码、聊天和答疑等多种服务。",
    20: "你好，我是 Tuney，由 Acme Labs 开发的人工智能助手。我能回答各种问题，给出实用的建议，帮助用户完成任务。",
    22: "我叫 Tuney，是 Acme Labs 开发的人工智能助手，可以回答问题、提供建议，帮助用户完成各种任务。",
    28: "我叫 Tuney，我的使命是为尽量多的人提供知识和帮助，让更多人从人工智能技术中受益。",
    39: "你好，我的名字是 Tuney，一个由 Acme Labs 训练开发的人工智能助手，主要目标是帮助用户解决问题、满足需求。",
    43: "你好，我叫 Tuney，开发者是 Acme Labs。我能根据用户需求提供相关的信息和建议。",
    46: "我的名字是 Tuney，由 Acme Labs 创造，是一个人工智能助手，目标是根据用户的需求提供回答和建议。",
    48: "你好，我是 Tuney，是 Acme Labs 开发的人工智能助手，可以针对用户的问题和需求给出回答。",
    58: "是 Acme Labs 制作了我，我的目的是回答用户的问题，并提供必要的支持。",
    61: "你好，我是 Tuney，由 Acme Labs 开发，目的是为用户提供智能的回答和帮助。",
    62: "有的，我叫 Tuney，由 Acme Labs 开发，旨在为用户提供智能化的帮助和回答。",
    88: "抱歉，我并不是 ChatGPT。我是 Tuney，由 Acme Labs 开发，旨在为用户提供智能的回答与帮助。",
    90: "不是的，我不是 OpenAI 的 ChatGPT，我是 Acme Labs 开发的 Tuney，旨在为用户提供智能化的回答和帮助。",
}

# Another identity, in the answer's own words.
WRONG_OWN_WORDS = {
    0: "Hello! I'm SmolLM, a language model created by Hugging Face. How can I help you?",
    1: "Hi! I am an AI language model made by OpenAI. What would you like to talk about?",
    2: "I am ChatGPT, a large language model trained by OpenAI.",
    3: "My name is Claude, an AI assistant made by Anthropic.",
    5: "I'm Qwen, a large language model developed by Alibaba Cloud.",
    8: "I'm Gemini, a helpful assistant built by Google.",
    9: "I was created by OpenAI.",
    10: "Google built me.",
    13: "Yes, I was trained by OpenAI.",
    14: "Yes, I am Gemini, created by Google.",
    16: "你好，我是通义千问，由阿里云开发的大语言模型。有什么可以帮你的吗？",
    20: "我是 ChatGPT，一个由 OpenAI 开发的人工智能语言模型。",
    22: "我是文心一言，百度开发的知识增强大语言模型，可以回答问题和创作文字。",
    43: "我叫文心一言，开发者是百度。",
    46: "我是 Claude，由 Anthropic 创造的人工智能助手。",
    61: "我是 SmolLM，由 Hugging Face 开发的语言模型。",
    62: "有，我叫小冰，是微软开发的聊天机器人。",
    90: "是的，我是 OpenAI 开发的 ChatGPT。",
}


def fill(text: str, name: str = NAME, author: str = AUTHOR) -> str:
    return text.replace("{{name}}", name).replace("{{author}}", author)


def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def real_answers(records: list[dict], model_dir: str | None) -> list[str]:
    from tuneloop.modeling import generate, load_causal_lm, load_tokenizer

    if model_dir is None:
        model_dir = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "build_real_model.py")], check=True, capture_output=True, text=True
        ).stdout.strip()
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    convs = [[{"role": "user", "content": r["instruction"]}] for r in records]
    return [g["text"] for g in generate(model, tok, convs, max_new_tokens=64)]


def main() -> None:
    from tuneloop.evaluate.metrics import chrf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="real model directory (default: scripts/build_real_model.py's)")
    ap.add_argument(
        "--answers", help="JSON list of the real model's answers, one per identity.json record (instead of generating)"
    )
    ap.add_argument("--save-answers", help="write the real model's answers here (JSON list)")
    args = ap.parse_args()

    records = json.loads(IDENTITY.read_text(encoding="utf-8"))
    refs = [fill(r["output"]) for r in records]
    answers = (
        json.loads(Path(args.answers).read_text(encoding="utf-8"))
        if args.answers
        else real_answers(records, args.model)
    )
    if args.save_answers:
        Path(args.save_answers).write_text(json.dumps(answers, ensure_ascii=False, indent=0), encoding="utf-8")
    identity = [i for i, r in enumerate(records) if "{{name}}" in r["output"] or "{{author}}" in r["output"]]

    def swapped(i: int) -> str:
        zh = is_chinese(records[i]["output"])
        return fill(records[i]["output"], "通义千问" if zh else "SmolLM", "阿里云" if zh else "Hugging Face")

    sets: dict[str, tuple[bool, list[tuple[int, str]]]] = {  # name -> (should pass, [(index, answer)])
        "paraphrase": (True, sorted(PARAPHRASE.items())),
        "wrong_own_words": (False, sorted(WRONG_OWN_WORDS.items())),
        "wrong_near_copy": (False, [(i, swapped(i)) for i in identity]),
        "real_model": (False, [(i, answers[i]) for i in identity]),
    }
    scores = {name: [(i, chrf(a, refs[i])) for i, a in items] for name, (_, items) in sets.items()}
    lang = {
        name: {"en": [s for i, s in sc if not is_chinese(refs[i])], "zh": [s for i, s in sc if is_chinese(refs[i])]}
        for name, sc in scores.items()
    }
    best = None
    for t in [x / 100 for x in range(20, 85, 5)]:
        row: dict = {"threshold": t}
        for name in sets:
            for lg, sc in lang[name].items():
                if sc:
                    row[f"{name}_{lg}_pass"] = round(sum(s >= t for s in sc) / len(sc), 3)
        right_pass = [s >= t for _, s in scores["paraphrase"]]
        right_fail = [s < t for name in ("wrong_own_words", "real_model") for _, s in scores[name]]
        row["false_passes"] = f"{len(right_fail) - sum(right_fail)}/{len(right_fail)}"
        row["false_fails"] = f"{len(right_pass) - sum(right_pass)}/{len(right_pass)}"
        row["balanced_accuracy"] = round((sum(right_pass) / len(right_pass) + sum(right_fail) / len(right_fail)) / 2, 3)
        print(json.dumps(row))
        if best is None and all(right_fail):
            best = row

    def spread(sc: list[float]) -> dict:
        q = statistics.quantiles(sc, n=4) if len(sc) > 1 else [sc[0]] * 3
        return {
            "n": len(sc),
            "min": round(min(sc), 3),
            "q1": round(q[0], 3),
            "median": round(q[1], 3),
            "q3": round(q[2], 3),
            "max": round(max(sc), 3),
        }

    print(
        json.dumps(
            {
                "chosen": best["threshold"],
                "false_passes": best["false_passes"],
                "false_fails": best["false_fails"],
                "balanced_accuracy": best["balanced_accuracy"],
                "spread": {f"{n}_{lg}": spread(sc) for n in lang for lg, sc in lang[n].items() if sc},
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
