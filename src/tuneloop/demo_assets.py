"""Everything ``tuneloop demo`` needs, made locally: a tokenizer, a tiny base model and a task.

Nothing here downloads anything; every generator is deterministic given its seed.

* ``make_tokenizer``: byte-level BPE with ChatML special tokens and a ChatML chat template.
* ``make_model``: a randomly initialised tiny ``LlamaForCausalLM``.
* ``general_corpus`` / ``general_text``: synthetic English-like text (templated sentences on a dozen topics,
  generic ChatML Q&A, customer messages without routing labels) for pretraining, and a held-out sample of
  general text for the capability check.
* ``build_base_model``: tokenizer + model, briefly pretrained on the general corpus, saved with
  ``save_pretrained``.
* ``task_records`` / ``write_demo_data``: the fine-tuning task, a customer-support ticket router (ticket
  text -> one of ``LABELS``). The base model reads tickets but has never seen the routing labels, so it
  scores ~0; a LoRA fine-tune learns the routing in about a minute of CPU.

``RECOMMENDED`` holds the settings that make the demo reliable and the results measured with them.

Design notes (what was measured to matter, so a later change does not undo it):

* The base model must already *read* tickets: the corpus contains customer messages (answered with a
  generic reply or a coarse topic such as "money", never a routing label) and topic-classification chats.
  Without them LoRA sits at chance for hundreds of steps.
* The labels must be words the base model can emit as a one-word answer ("Say only this word: refund"
  chats); a label made of never-emitted tokens does not move under LoRA at these sizes.
* The demo system prompt starts with "Answer with one word." as the corpus's one-word chats do.
* Half the training set is general chat (``general_mix``); without it the fine-tune costs 0.02-0.1 of
  next-token accuracy on general text, with it ~0.01. Long general answers are left out of the mix
  because the loss is averaged per token and they would drown the one-token labels.
* Sentence slots are filled with Zipf-weighted choices, as words are in real text, so the most likely
  next token has a margin and next-token accuracy is a stable measure.
* Ticket variety, not repetition, is what lifts accuracy without costing general capability. The errors
  of a weak fine-tune follow the filler sentences (an "other" ticket with "every February" or "on Sunday"
  routed to shipping, "before it ships" to shipping): with 480 tickets each intent sentence is seen ~10
  times with few fillers, and the model leans on the fillers. Measured on a 2-vCPU Intel Xeon (demo
  pipeline and gates, seed 0 unless said): 480 tickets x 8 epochs at lr 1.5e-3: accuracy 0.825 (interval
  straddles 0.85); lr 3e-3: 0.933; 12 epochs: 0.942 but capability drop 0.021; LoRA r=32: 0.967 but drop
  0.025; lr 5e-3: 1.000 but drop 0.019. 960 tickets x 4 epochs at lr 3e-3 (the same ~350 steps): 0.975-0.992
  on seeds 0-2, but drops up to 0.019 (capability gate inconclusive on 2 of 3 seeds); at lr 1.5e-3 only
  0.800; r=8 or lr 2.5e-3 traded accuracy for drift without fixing it; attention-only LoRA was worse at
  both. 1920 tickets x 2 epochs at lr 3e-3 (again ~350 steps): 0.967 / 0.967 / 0.975 with drops 0.010 /
  0.006 / 0.011 (``RECOMMENDED["results"]``). A higher learning rate is needed for accuracy, and seeing each
  ticket fewer times keeps the drift down.
* The base model is shipped prebuilt (``resources/demo_base``, ``scripts/build_demo_base.py``): pretraining
  on another CPU gives other weights (floating-point order differs), and the demo's margins should not
  depend on the machine's pretraining.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

from tuneloop.modeling import CHATML_TEMPLATE, save_tokenizer  # noqa: E402  (one ChatML definition for the project)

LABELS = ("refund", "shipping", "password", "cancel", "billing", "other")

SYSTEM_PROMPT = (
    "Answer with one word. Route this customer support ticket: refund, shipping, password, cancel, billing or other."
)

#: Settings measured to make the demo reliable (3 seeds), and what they gave. ``lora`` is what the
#: pipeline's fine-tune should use: PEFT ``LoraConfig(r, lora_alpha, lora_dropout,
#: target_modules="all-linear")``, Trainer defaults otherwise (AdamW, linear decay, no warmup), loss on
#: the assistant answer + ``<|im_end|>`` only. The demo's gates are ``min_accuracy: 0.85`` and
#: ``max_capability_drop: 0.02``, decided on one-sided 95 % bounds: with 120 eval tickets an accuracy of
#: 0.967 has a lower bound of 0.928 (Wilson), and a drop of 0.0106 on ~9,800 general tokens an upper bound
#: of ~0.0136, so both gates pass with room on every seed measured.
RECOMMENDED: dict[str, Any] = {
    "model": {
        "hidden_size": 128,
        "num_layers": 2,
        "num_heads": 8,
        "intermediate_size": 256,
        "max_position_embeddings": 256,
        "vocab_size": 2048,
    },
    "pretrain": {"steps": 800, "batch_size": 8, "seq_len": 128, "learning_rate": 6e-3, "n_docs": 12000},
    "data": {"n_train": 1920, "n_eval": 120, "general_mix": 0.5},
    "lora": {
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
        "learning_rate": 3e-3,
        "num_epochs": 2,
        "batch_size": 16,
        "max_length": 128,
    },
    # Measured by running the demo's pipeline (``tuneloop demo``'s config, data and gates; only the seed of
    # the data and the fine-tune varied: 0 is the demo's) from the shipped base model
    # (``resources/demo_base``) on a shared 2-vCPU Intel Xeon, torch 2.13 CPU, transformers 5.24,
    # 2026-11-30. The previous recipe (480 tickets x 8 epochs at lr 1.5e-3, tuned on a 2-vCPU AMD EPYC
    # where it gave 0.975 / 0.942 / 0.958) reached 0.825 there: the gate's interval [0.761, 0.875]
    # straddled 0.85 and the demo exited 1.
    "results": {
        "machine": "2-vCPU Intel Xeon (shared with other jobs), torch 2.13.0 CPU, transformers 5.24.0",
        "seeds": [0, 1, 2],
        "base_accuracy": [0.0, 0.0, 0.0],
        "lora_accuracy": [0.967, 0.967, 0.975],
        "lora_accuracy_lower_bound": [0.928, 0.928, 0.939],
        "general_next_token_accuracy_base": [0.6599, 0.6622, 0.6804],
        "general_next_token_accuracy_lora": [0.6498, 0.6559, 0.6699],
        "capability_drop": [0.0101, 0.0064, 0.0106],
        "capability_drop_upper_bound": [0.0131, 0.0096, 0.0136],
        "training_records_kept_of_2880": [2795, 2779, 2809],  # the data gate drops eval look-alikes
        "pretrain_seconds": 141.8,
        "lora_train_seconds": [33.2, 32.8, 37.1],
        "lora_steps": [350, 348, 352],
        "params": 590464,
        "lora_params": 69632,
        "timing_note": (
            "pretraining: scripts/build_demo_base.py, 1 torch thread, while other jobs ran; the demo no "
            "longer pretrains unless the shipped base is missing or stale. LoRA: the pipeline's training "
            "stage on an otherwise lightly loaded machine"
        ),
    },
}


# --------------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------------


def make_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Special tokens ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>`` (ids 0, 1, 2); eos is ``<|im_end|>``,
    pad is ``<|pad|>``, no bos. A ChatML chat template is set, so ``apply_chat_template`` works and the
    tokenizer round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_model(
    tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 8,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    seed: int = 0,
):
    """A randomly initialised float32 ``LlamaForCausalLM`` sized for ``tokenizer`` (tied embeddings)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


# --------------------------------------------------------------------------------------------------
# General corpus
# --------------------------------------------------------------------------------------------------

_NAMES = (
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Liam",
    "Maya",
    "Nico",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Will",
    "Yuki",
    "Zoe",
    "Marta",
    "Peter",
    "Lucia",
    "Omar",
    "Sofia",
    "Tom",
    "Nina",
    "Alex",
    "Priya",
    "Chen",
    "Mateo",
)
_CITIES = (
    "Berlin",
    "Paris",
    "Madrid",
    "Rome",
    "Oslo",
    "Lisbon",
    "Vienna",
    "Prague",
    "Dublin",
    "Warsaw",
    "Athens",
    "Boston",
    "Denver",
    "Chicago",
    "Toronto",
    "Sydney",
    "Tokyo",
    "Seoul",
    "Cairo",
    "Lima",
    "Nairobi",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_COLORS = ("red", "blue", "green", "black", "white", "grey", "yellow", "silver", "brown", "orange")
_PRODUCTS = (
    "jacket",
    "laptop",
    "phone case",
    "coffee maker",
    "backpack",
    "lamp",
    "headphones",
    "blender",
    "desk",
    "chair",
    "watch",
    "kettle",
    "camera",
    "printer",
    "keyboard",
    "monitor",
    "sofa",
    "rug",
    "tent",
    "bicycle",
    "toaster",
    "speaker",
    "mattress",
    "vacuum cleaner",
    "router",
    "jumper",
    "pair of boots",
    "scarf",
)

# topic -> (subjects, verbs/predicates, objects/places, adjectives)
_TOPICS: dict[str, tuple[tuple[str, ...], ...]] = {
    "animals": (
        (
            "the fox",
            "a small dog",
            "the old cat",
            "a young horse",
            "the brown bear",
            "a flock of birds",
            "the rabbit",
            "a tiny mouse",
            "the owl",
            "a herd of deer",
        ),
        ("runs across", "sleeps near", "hides behind", "walks along", "looks at", "jumps over", "waits by"),
        ("the river", "the barn", "the fence", "the old tree", "the garden", "the hill", "the quiet lake"),
        ("quick", "sleepy", "curious", "gentle", "wild", "hungry", "shy", "clever"),
    ),
    "weather": (
        (
            "the wind",
            "the rain",
            "a cold front",
            "the morning fog",
            "the summer sun",
            "a heavy storm",
            "the snow",
            "the clouds",
        ),
        ("moves over", "falls on", "covers", "passes through", "warms", "drifts across", "clears from"),
        ("the valley", "the coast", "the city", "the mountains", "the fields", "the harbour", "the plains"),
        ("warm", "cold", "dry", "humid", "bright", "grey", "calm", "stormy"),
    ),
    "cooking": (
        ("the chef", "my grandmother", "the baker", "a student", "the cook", "our neighbour", "the family"),
        ("prepares", "slices", "bakes", "stirs", "tastes", "serves", "boils", "roasts"),
        (
            "fresh bread",
            "a pot of soup",
            "the vegetables",
            "a lemon cake",
            "the rice",
            "some pasta",
            "a bowl of salad",
            "the onions",
        ),
        ("delicious", "simple", "spicy", "sweet", "salty", "hot", "crispy", "tender"),
    ),
    "travel": (
        ("the travellers", "a tourist", "the pilot", "our group", "the family", "a young couple", "the driver"),
        ("arrives in", "leaves", "flies to", "drives through", "visits", "explores", "returns from"),
        tuple(_CITIES),
        ("long", "short", "pleasant", "busy", "quiet", "crowded", "scenic", "early"),
    ),
    "science": (
        ("the scientist", "a physicist", "the research team", "the student", "a chemist", "the biologist"),
        ("measures", "studies", "observes", "records", "explains", "tests", "compares"),
        ("the light", "the cells", "the samples", "the temperature", "the data", "the orbit", "the waves"),
        ("careful", "precise", "new", "simple", "strange", "small", "important"),
    ),
    "sports": (
        ("the team", "the runner", "a swimmer", "the coach", "the players", "the goalkeeper", "a cyclist"),
        ("trains for", "wins", "loses", "prepares for", "plays in", "practises for", "watches"),
        ("the final", "the match", "the race", "the season", "the tournament", "the game", "the cup"),
        ("fast", "strong", "tired", "proud", "young", "skilled", "nervous"),
    ),
    "music": (
        ("the band", "a pianist", "the singer", "the orchestra", "a violinist", "the choir", "the drummer"),
        ("plays", "sings", "records", "performs", "practises", "writes", "rehearses"),
        ("a slow song", "the old melody", "a new album", "the concert", "a short piece", "the symphony"),
        ("loud", "soft", "beautiful", "sad", "happy", "famous", "lively"),
    ),
    "history": (
        ("the king", "an old empire", "the merchants", "the villagers", "a famous queen", "the soldiers"),
        ("built", "ruled", "defended", "traded with", "left", "founded", "discovered"),
        ("the castle", "the old port", "a small town", "the northern lands", "the bridge", "the temple"),
        ("ancient", "powerful", "forgotten", "rich", "proud", "distant", "great"),
    ),
    "gardening": (
        ("the gardener", "my father", "the children", "a neighbour", "the farmer", "our class"),
        ("plants", "waters", "picks", "grows", "prunes", "harvests", "digs up"),
        ("the tomatoes", "some roses", "the apple tree", "fresh herbs", "the carrots", "the tulips"),
        ("green", "tall", "ripe", "young", "colourful", "healthy", "small"),
    ),
    "computers": (
        ("the programmer", "a new laptop", "the server", "the engineer", "the software", "the network"),
        ("runs", "stores", "sends", "updates", "checks", "compiles", "downloads"),
        ("the files", "a large program", "the messages", "the database", "the report", "the code"),
        ("fast", "slow", "secure", "modern", "reliable", "busy", "broken"),
    ),
    "service": (
        (
            "the support agent",
            "a customer",
            "the bank",
            "the account manager",
            "the help desk",
            "the courier",
            "the accountant",
            "my colleague",
        ),
        (
            "checks",
            "updates",
            "cancels",
            "refunds",
            "ships",
            "charges",
            "resets",
            "tracks",
            "sends",
            "explains",
            "forgets",
            "logs in to",
        ),
        (
            "the password",
            "the invoice",
            "the subscription",
            "the parcel",
            "the payment",
            "the order",
            "the account",
            "the receipt",
            "the membership",
            "the credit card",
            "the tracking number",
            "the delivery",
            "the login page",
            "the refund",
        ),
        ("late", "urgent", "monthly", "annual", "wrong", "correct", "secure", "friendly", "helpful"),
    ),
    "shopping": (
        (
            "the customer",
            "a shopper",
            "my sister",
            "the store",
            "the online shop",
            "the cashier",
            "the delivery driver",
            "our company",
        ),
        ("orders", "buys", "delivers", "packs", "sells", "returns", "pays for", "wraps"),
        tuple(f"the {p}" for p in _PRODUCTS),
        ("cheap", "expensive", "new", "used", "heavy", "light", "useful", "popular"),
    ),
}

_SENTENCE_FRAMES = (
    "{S} {V} {O}.",
    "In the {adj} morning, {s} {V} {O}.",
    "Every {day}, {s} {V} {O}.",
    "{S} often {V} {O} with {name}.",
    "{name} says that {s} {V} {O}.",
    "It is {adj} today, so {s} {V} {O}.",
    "In {month}, {s} {V} {O} again.",
    "{S} {V} {O}, and {s2} {V2} {O2}.",
    "After lunch, {s} {V} {O} in {city}.",
    "Nobody knows why {s} {V} {O}.",
    "{S} {V} {O} because it is {adj}.",
    "Yesterday {s} {V} {O} for the first time.",
)

_QA = (
    ("What is the capital of {country}?", "The capital of {country} is {capital}."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Can you tell me something about {topic}?", "{sentence}"),
    ("Write one sentence about {topic}.", "{sentence}"),
    ("Which month comes after {month}?", "The month after {month} is {next_month}."),
    ("What day comes after {day}?", "The day after {day} is {next_day}."),
    ("What is {a} plus {b}?", "{a} plus {b} is {sum}."),
    ("Say hello to {name}.", "Hello, {name}! It is nice to meet you."),
    ("Give me a short tip for a {adj} day.", "On a {adj} day, it is good to take a short walk."),
    ("Who are you?", "I am a small assistant. I answer questions with short sentences."),
    ("Describe the {color} {product}.", "The {color} {product} is {adj} and easy to use."),
    ("Write a few sentences about {topic}.", "{paragraph}"),
    ("Tell me a short story about {topic}.", "{paragraph}"),
)
_COUNTRIES = (
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Norway", "Oslo"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Germany", "Berlin"),
)


_ZIPF_CUM: dict[int, list[float]] = {}


def _zipf(rng: random.Random, seq):
    """Pick from ``seq`` with Zipf weights 1/rank, as word choice is in real text (and so that the most
    likely continuation has a clear margin, which keeps next-token accuracy a stable measure)."""
    n = len(seq)
    cum = _ZIPF_CUM.get(n)
    if cum is None:
        cum, total = [], 0.0
        for i in range(n):
            total += 1.0 / (i + 1)
            cum.append(total)
        _ZIPF_CUM[n] = cum
    return rng.choices(seq, cum_weights=cum)[0]


def _sentence(rng: random.Random, topic: str | None = None) -> str:
    topic = topic or rng.choice(list(_TOPICS))
    subs, verbs, objs, adjs = _TOPICS[topic]
    z = _zipf
    s, s2 = z(rng, subs), z(rng, subs)
    fill = {
        "s": s,
        "S": s[0].upper() + s[1:],
        "V": z(rng, verbs),
        "O": z(rng, objs),
        "s2": s2,
        "V2": z(rng, verbs),
        "O2": z(rng, objs),
        "adj": z(rng, adjs),
        "day": z(rng, _DAYS),
        "month": z(rng, _MONTHS),
        "name": z(rng, _NAMES),
        "city": z(rng, _CITIES),
    }
    out = z(rng, _SENTENCE_FRAMES).format(**fill)
    return out[0].upper() + out[1:]


def _paragraph(rng: random.Random, topic: str | None = None) -> str:
    topic = topic or rng.choice(list(_TOPICS))
    n = rng.randint(3, 7)
    # Mostly on one topic, sometimes drifting to another, like real text.
    return " ".join(_sentence(rng, topic if rng.random() < 0.8 else None) for _ in range(n))


# Word list for the "repeat the word" chats: topic words plus the support vocabulary, so the base model
# can emit any of these words on its own line (it never sees which ticket goes with which label).
_WORDS = tuple(
    sorted(
        {
            w
            for topic in _TOPICS.values()
            for group in (topic[2], topic[3])
            for phrase in group
            for w in phrase.split()
            if w.isalpha() and w not in ("the", "a", "of", "some", "my", "pair")
        }
        | set(_TOPICS)
        | {"refund", "shipping", "password", "cancel", "billing", "other", "order", "invoice"}
    )
)

_SHORT_QA = (
    ("What is this text about? {sentence}", "{topic}"),
    ("{sentence} Which topic is this?", "{topic}"),
    ("Name the topic of this sentence: {sentence}", "{topic}"),
    ("What colour is the {color} {product}?", "{color}"),
    ("{name} lives in {city}. Where does {name} live?", "{city}"),
    ("Repeat the word: {word}", "{word}"),
    ("Say only this word: {support_word}", "{support_word}"),
    ("What is {a} plus {b}? Answer with a number.", "{sum}"),
    ("Which day comes after {day}? One word.", "{next_day_lower}"),
)


def _qa_turn(rng: random.Random, short: bool) -> tuple[str, str]:
    q, a = rng.choice(_SHORT_QA if short else _QA)
    country, capital = rng.choice(_COUNTRIES)
    mi, di = rng.randrange(12), rng.randrange(7)
    x, y = rng.randint(1, 20), rng.randint(1, 20)
    topic = rng.choice(list(_TOPICS))
    fill = {
        "country": country,
        "capital": capital,
        "topic": topic,
        "sentence": _sentence(rng, topic),
        "month": _MONTHS[mi],
        "next_month": _MONTHS[(mi + 1) % 12],
        "day": _DAYS[di],
        "next_day": _DAYS[(di + 1) % 7],
        "next_day_lower": _DAYS[(di + 1) % 7].lower(),
        "a": x,
        "b": y,
        "sum": x + y,
        "name": rng.choice(_NAMES),
        "adj": rng.choice(_TOPICS["weather"][3]),
        "color": rng.choice(_COLORS),
        "product": rng.choice(_PRODUCTS),
        "city": rng.choice(_CITIES),
        "word": rng.choice(_WORDS),
        "support_word": rng.choice(_SUPPORT_WORDS),
    }
    if "{paragraph}" in a:
        fill["paragraph"] = _paragraph(rng, topic)
    return q.format(**fill), a.format(**fill)


def _system_for(rng: random.Random, short: bool) -> str | None:
    if short and rng.random() < 0.5:
        return "Answer with one word."
    if not short and rng.random() < 0.3:
        return "You are a helpful assistant. Answer briefly."
    return None


def _chat(rng: random.Random) -> str:
    short = rng.random() < 0.6
    system = _system_for(rng, short)
    turns = [("system", system)] if system else []
    for _ in range(rng.randint(1, 2)):
        user, assistant = _qa_turn(rng, short)
        turns += [("user", user), ("assistant", assistant)]
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)


_MIX_MAX_ANSWER_CHARS = 120


def general_chat_records(n: int, seed: int) -> list[dict]:
    """``n`` single-turn general chat records (messages format, unique user texts) from the same
    distribution as the chats in ``general_corpus``. Mixed into the demo training set so the fine-tune
    keeps the base model's general behaviour (the usual remedy for forgetting)."""
    rng = random.Random(f"general-chat-{seed}")
    out: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * max(n, 1):
            raise RuntimeError(f"could not generate {n} unique general chat records")
        short = rng.random() < 0.4
        system = _system_for(rng, short)
        user, assistant = _qa_turn(rng, short)
        if user in seen or len(assistant) > _MIX_MAX_ANSWER_CHARS:  # long answers outweigh one-word labels
            continue
        seen.add(user)
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append({"messages": msgs})
    return out


_CHAT_FRACTION = 0.4
# Support and shop vocabulary for the "say only this word" chats, so the base model can emit these words
# (the demo's labels among them) as a one-word answer. It never learns which ticket goes with which.
_SUPPORT_WORDS = (
    "refund",
    "shipping",
    "password",
    "cancel",
    "billing",
    "other",
    "order",
    "invoice",
    "parcel",
    "payment",
    "account",
    "login",
    "delivery",
    "receipt",
    "subscription",
    "membership",
    "tracking",
    "return",
    "charge",
    "discount",
    "price",
    "address",
    "courier",
    "package",
    "warranty",
    "exchange",
    "store",
    "customer",
    "support",
    "email",
    "card",
    "basket",
    "checkout",
    "voucher",
    "coupon",
    "size",
    "stock",
    "plan",
)


_SUPPORT_FRACTION = 0.15
_COARSE_SHARE = 0.4
_REPLIES = (
    "Thank you for your message. A member of our team will reply soon.",
    "We are sorry for the trouble, {name}. We will look into it today.",
    "Thanks for writing to us. We have received your message.",
    "Hello {name}, thank you for contacting us. We will get back to you shortly.",
    "Thank you. Your message has been passed to our team.",
)


# What a customer message is about, in coarse everyday words. A real base model can say this much about a
# ticket; it cannot know the shop's own routing labels (refund and billing are both "money" here).
_COARSE = {
    "refund": "money",
    "billing": "money",
    "shipping": "delivery",
    "password": "account",
    "cancel": "order",
    "other": "question",
}


def _support_doc(rng: random.Random) -> str:
    """Customer messages of the kind the demo task routes, never with a routing label."""
    label = rng.choice(LABELS)
    frame = _frame(rng, _INTENTS[label])
    text = _ticket(rng, _INTENTS[label], frame)
    r = rng.random()
    if r < _COARSE_SHARE:
        system = f"{IM_START}system\nAnswer with one word.{IM_END}\n" if rng.random() < 0.5 else ""
        return (
            f"{system}{IM_START}user\nWhat is this message about? {text}{IM_END}\n"
            f"{IM_START}assistant\n{_COARSE[label]}{IM_END}\n"
        )
    if r < (1 + _COARSE_SHARE) / 2:
        return f"Message from a customer: {text}"
    reply = rng.choice(_REPLIES).format(name=rng.choice(_NAMES))
    return f"{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n{reply}{IM_END}\n"


def _doc(rng: random.Random) -> str:
    r = rng.random()
    if r < _CHAT_FRACTION:
        return _chat(rng)
    if r < _CHAT_FRACTION + _SUPPORT_FRACTION:
        return _support_doc(rng)
    return _paragraph(rng)


def general_corpus(n: int, seed: int) -> list[str]:
    """``n`` synthetic documents: English-like paragraphs on a dozen topics (~45%), generic ChatML Q&A
    (~40%) and customer messages without routing labels (~15%)."""
    rng = random.Random(f"general-{seed}")
    return [_doc(rng) for _ in range(n)]


def general_text(seed: int, n_docs: int = 200) -> str:
    """A held-out general-text sample (~45 KB, ~9,500 tokens) for the capability check: paragraphs and
    generic chats from a generator stream disjoint from ``general_corpus`` (no customer-support text: that
    is the task's domain, which the eval set measures). 200 documents rather than 80 narrow the capability
    gate's interval by ~1.6x (half-width ~0.0035 instead of ~0.006 of next-token accuracy)."""
    rng = random.Random(f"general-heldout-{seed}")
    docs = [_chat(rng) if rng.random() < 0.4 else _paragraph(rng) for _ in range(n_docs)]
    return "\n\n".join(docs) + "\n"


# --------------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------------


def build_base_model(
    out_dir: Path,
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    steps: int | None = None,
    n_docs: int | None = None,
    num_threads: int | None = None,
) -> dict:
    """Train a tokenizer and a tiny Llama on the general corpus and save both into ``out_dir``.

    Plain causal-LM pretraining (AdamW, warmup + cosine, random 128-token windows of the packed corpus),
    seeded throughout. ``steps`` / ``n_docs`` default to ``RECOMMENDED["pretrain"]`` (tests pass small
    values). ``progress(step, total)`` is called after every optimiser step. ``num_threads`` sets torch's
    intra-op threads for the duration of the call (``None``: leave them as they are).

    The directory is written next to its final place and moved in when complete, so a killed build never
    leaves a half-saved model. Besides the model and tokenizer files it holds ``tuneloop_base.json``: the
    seed, settings and the returned stats. Returns ``{"params", "steps", "seconds", "final_loss", ...}``;
    ``final_loss`` is an exponential moving average of the training loss over the last steps.
    """
    import torch

    from tuneloop.fsutil import atomic_write_json, replace_dir

    t0 = time.perf_counter()
    pre, size = RECOMMENDED["pretrain"], RECOMMENDED["model"]
    steps = pre["steps"] if steps is None else steps
    n_docs = pre["n_docs"] if n_docs is None else n_docs
    bs, seq_len, lr = pre["batch_size"], pre["seq_len"], pre["learning_rate"]
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        docs = general_corpus(n_docs, seed)
        tokenizer = make_tokenizer(docs, vocab_size=size["vocab_size"])
        model = make_model(
            tokenizer,
            hidden_size=size["hidden_size"],
            num_layers=size["num_layers"],
            num_heads=size["num_heads"],
            intermediate_size=size["intermediate_size"],
            max_position_embeddings=size["max_position_embeddings"],
            seed=seed,
        )

        # One token stream, documents separated by eos; each step samples random windows from it.
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if not ids or ids[-1] != eos:
                stream.append(eos)
        data = torch.tensor(stream, dtype=torch.long)
        if len(data) <= seq_len + 1:
            raise ValueError(f"corpus of {n_docs} documents is too small for {seq_len}-token windows")
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        warmup = max(1, steps // 20)

        def lr_at(step: int) -> float:
            if step < warmup:
                return lr * (step + 1) / warmup
            frac = (step - warmup) / max(1, steps - warmup)
            return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

        model.train()
        ema: float | None = None
        for step in range(steps):
            starts = torch.randint(0, len(data) - seq_len - 1, (bs,), generator=gen).tolist()
            x = torch.stack([data[i : i + seq_len] for i in starts])
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = loss.item()
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            if progress is not None:
                progress(step + 1, steps)
        model.eval()
    finally:
        torch.set_num_threads(old_threads)

    stats = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": round(ema, 4) if ema is not None else None,
        "corpus_docs": n_docs,
        "corpus_tokens": len(stream),
        "vocab_size": len(tokenizer),
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tokenizer, tmp)  # loadable by transformers 4.x as well as 5.x
    atomic_write_json(
        tmp / "tuneloop_base.json",
        {
            "made_by": "tuneloop.demo_assets.build_base_model",
            "seed": seed,
            "model": size,
            "pretrain": {**pre, "steps": steps, "n_docs": n_docs},
            "stats": stats,
        },
    )
    replace_dir(tmp, out_dir)
    return stats


#: The seed the demo's base model is built with (the shipped one and the fallback alike).
DEMO_BASE_SEED = 0

#: The package folder that holds the prebuilt demo base model (``scripts/build_demo_base.py`` writes it).
SHIPPED_BASE_DIR = Path(__file__).resolve().parent / "resources" / "demo_base"


def base_recipe(seed: int = DEMO_BASE_SEED) -> dict[str, Any]:
    """What determines the demo base model: the model size, the pretraining settings and the seed."""
    return {"model": RECOMMENDED["model"], "pretrain": RECOMMENDED["pretrain"], "seed": seed}


def shipped_base_model(base_dir: Path = SHIPPED_BASE_DIR, *, seed: int = DEMO_BASE_SEED) -> Path | None:
    """The prebuilt base model shipped in the package, or ``None`` when it is missing or stale.

    Stale means its ``tuneloop_base.json`` records another recipe than :func:`base_recipe` (someone changed
    ``RECOMMENDED`` without running ``scripts/build_demo_base.py``); the demo then builds the base itself.
    """
    meta_path = Path(base_dir) / "tuneloop_base.json"
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not meta_path.is_file() or not all((Path(base_dir) / name).is_file() for name in needed):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    made = {"model": meta.get("model"), "pretrain": meta.get("pretrain"), "seed": meta.get("seed")}
    return Path(base_dir) if made == base_recipe(seed) else None


# --------------------------------------------------------------------------------------------------
# The fine-tuning task: support-ticket routing
# --------------------------------------------------------------------------------------------------

_GREETINGS = (
    "",
    "Hi,",
    "Hello,",
    "Hello team,",
    "Dear support,",
    "Hey there.",
    "Good morning,",
    "Hi support team,",
    "Good evening.",
    "To whom it may concern,",
)
_INTROS = (
    "",
    "My name is {name}.",
    "This is {name} here.",
    "{name} writing.",
    "I am {name} from {city}.",
    "It's {name} again.",
)
_CONTEXT = (
    "",
    "I ordered a {color} {product} last {day}.",
    "My order number is {order}.",
    "I have been a customer for {years} years.",
    "I bought the {product} on {day}.",
    "I live in {city}.",
    "I usually shop with you every {month}.",
    "It was a gift for {name2}.",
    "I paid with my card.",
    "The {product} is for my office.",
)
_INTENTS: dict[str, tuple[str, ...]] = {
    "refund": (
        "I want my money back for the {product}.",
        "Please refund order {order}.",
        "Can I get a refund for the {product}?",
        "The {product} arrived broken and I would like a refund.",
        "How do I return the {product} and get my money back?",
        "I returned the {product} {days} days ago but the refund has not come through.",
        "The {product} does not work, I want a full refund.",
        "I would like to send the {product} back for a refund.",
    ),
    "shipping": (
        "Where is my package?",
        "My {product} has not arrived yet.",
        "The tracking for order {order} has not updated in {days} days.",
        "When will the {product} be delivered?",
        "The courier left my parcel at the wrong address.",
        "Order {order} still shows as in transit.",
        "Can you tell me the delivery date for the {product}?",
        "My parcel is late and nobody knows where it is.",
    ),
    "password": (
        "I forgot my password.",
        "I cannot log in to my account.",
        "The password reset email never came.",
        "My account is locked after too many login attempts.",
        "How do I change my password?",
        "The login page says my password is wrong.",
        "I need a new password for my account.",
        "The reset link for my password has expired.",
    ),
    "cancel": (
        "Please cancel my subscription.",
        "I want to cancel order {order} before it ships.",
        "Stop my membership, I no longer need it.",
        "How do I cancel the {product} I ordered today?",
        "Cancel my plan at the end of this month please.",
        "I changed my mind, please cancel the order for the {product}.",
        "I would like to end my subscription now.",
        "Please cancel everything on order {order}.",
    ),
    "billing": (
        "I was charged twice for order {order}.",
        "There is an unknown charge of {amount} on my card.",
        "My invoice shows the wrong amount.",
        "Why did my card get charged {amount}?",
        "Please update the credit card on my account.",
        "The invoice for the {product} has the wrong address.",
        "I see a payment of {amount} that I do not recognise.",
        "Can you send me a copy of my invoice for order {order}?",
    ),
    "other": (
        "Do you have a store in {city}?",
        "I just wanted to say the {product} is great.",
        "What are your opening hours on {day}?",
        "Do you sell gift cards?",
        "Can you recommend a {product} for a child?",
        "Is the {color} {product} available in a larger size?",
        "Do you offer student discounts?",
        "Who makes the {product} you sell?",
    ),
}
_CLOSINGS = (
    "",
    "Thanks.",
    "Thank you!",
    "Thanks, {name}",
    "Regards, {name}",
    "Best wishes.",
    "Please help asap.",
    "Cheers",
    "Thx",
    "Have a nice day.",
)


def _frame(rng: random.Random, sentences: tuple[str, ...]) -> tuple[int, int, int, int, int]:
    """Template indices (greeting, intro, context, intent sentence, closing); each filler part is absent
    (index 0, the empty string) about half the time, so tickets range from one sentence to five."""

    def part(options: tuple[str, ...]) -> int:
        return 0 if rng.random() < _FILLER_ABSENT else rng.randrange(1, len(options))

    return (part(_GREETINGS), part(_INTROS), part(_CONTEXT), rng.randrange(len(sentences)), part(_CLOSINGS))


_FILLER_ABSENT = 0.5


def _ticket(rng: random.Random, sentences: tuple[str, ...], frame: tuple[int, int, int, int, int]) -> str:
    gi, ii, ci, ti, cli = frame
    fill = {
        "name": rng.choice(_NAMES),
        "name2": rng.choice(_NAMES),
        "city": rng.choice(_CITIES),
        "color": rng.choice(_COLORS),
        "product": rng.choice(_PRODUCTS),
        "day": rng.choice(_DAYS),
        "month": rng.choice(_MONTHS),
        "order": f"#{rng.randint(10000, 99999)}",
        "years": rng.randint(2, 15),
        "days": rng.randint(2, 14),
        "amount": f"${rng.randint(5, 400)}.{rng.randint(0, 99):02d}",
    }
    parts = [
        _GREETINGS[gi],
        _INTROS[ii].format(**fill),
        _CONTEXT[ci].format(**fill),
        sentences[ti].format(**fill),
        _CLOSINGS[cli].format(**fill),
    ]
    # The intent sentence sometimes comes before the context, as people write.
    if rng.random() < 0.3:
        parts[2], parts[3] = parts[3], parts[2]
    text = " ".join(p for p in parts if p)
    # Noise: lower-casing, extra punctuation, doubled spaces.
    r = rng.random()
    if r < 0.15:
        text = text.lower()
    elif r < 0.25:
        text = text.rstrip(".!?") + "!!"
    return text


def _frame_split(label: str, frame: tuple[int, ...]) -> str:
    """Deterministic split of the (label, template combination) space: ~20% of combinations are eval-only."""
    h = hashlib.sha256(f"{label}|{frame[0]}|{frame[2]}|{frame[3]}".encode()).digest()
    return "eval" if h[0] % 5 == 0 else "train"


def task_records(n: int, seed: int, *, split: str | None = None, system_prompt: bool = True) -> list[dict]:
    """``n`` ticket-routing records in OpenAI messages format, deterministic given ``seed``.

    Labels are balanced (round robin over ``LABELS``, then shuffled); user texts are unique within the
    result. ``split="train"`` / ``"eval"`` draws only from that part of the template-combination space
    (greeting x context x intent sentence), so eval tickets combine sentences in ways training never shows;
    ``None`` draws from the whole space.
    """
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be None, 'train' or 'eval', got {split!r}")
    rng = random.Random(f"task-{seed}-{split}")
    records: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 200 * max(n, 1):
            raise RuntimeError(f"could not generate {n} unique tickets")
        label = LABELS[len(records) % len(LABELS)]
        frame = _frame(rng, _INTENTS[label])
        if split is not None and _frame_split(label, frame) != split:
            continue
        text = _ticket(rng, _INTENTS[label], frame)
        if text in seen:
            continue
        seen.add(text)
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}] if system_prompt else []
        msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
        records.append({"messages": msgs})
    rng.shuffle(records)
    return records


def write_demo_data(
    data_dir: Path, *, n_train: int, n_eval: int, seed: int, general_mix: float | None = None
) -> tuple[Path, Path]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``general.txt`` into ``data_dir``; return the first two.

    ``train.jsonl``: ``n_train`` ticket records plus ``round(general_mix * n_train)`` general chat records
    (``general_mix`` defaults to ``RECOMMENDED["data"]["general_mix"]``), shuffled. ``eval.jsonl``:
    ``n_eval`` ticket records whose template combinations (and so user texts) never occur in training.
    ``general.txt``: ``general_text(seed)``, held-out general text for the capability check.
    """
    if general_mix is None:
        general_mix = RECOMMENDED["data"]["general_mix"]
    from tuneloop.fsutil import atomic_write_text

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    train = task_records(n_train, seed, split="train")
    evals = task_records(n_eval, seed, split="eval")
    train += general_chat_records(round(general_mix * n_train), seed)
    random.Random(f"mix-{seed}").shuffle(train)
    train_texts = {r["messages"][-2]["content"] for r in train}
    if any(r["messages"][-2]["content"] in train_texts for r in evals):  # cannot happen: disjoint splits
        raise RuntimeError("demo eval set overlaps the training set")
    train_path, eval_path = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    atomic_write_text(train_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    atomic_write_text(eval_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in evals))
    atomic_write_text(data_dir / "general.txt", general_text(seed))
    return train_path, eval_path


# --------------------------------------------------------------------------------------------------
# The closed-loop demo: an intent production brings that iteration 1 never saw
# --------------------------------------------------------------------------------------------------

#: Two-factor login codes: a feature the shop launched after iteration 1 was trained. The support team routes
#: these tickets to ``password``. Neither the base corpus nor iteration 1's training data holds one of these
#: sentences; measured on iteration 1 of the demo (seed 0), it routes them to ``shipping``, 0 of 40 right.
NEW_INTENT: dict[str, Any] = {
    "name": "two-factor login codes",
    "label": "password",
    "sentences": (
        "The verification code for my login never arrives.",
        "My two-factor code is not accepted.",
        "I lost the phone with my authenticator app.",
        "The text message with my security code did not come.",
        "My one-time code keeps saying invalid.",
        "The login code you text me expires before I can type it.",
        "I changed my phone number and now I get no sign-in codes.",
        "The authenticator app shows a code but the site rejects it.",
        "How do I turn off two-step verification?",
        "I need new backup codes for my two-factor login.",
    ),
}


def new_intent_records(n: int, seed: int, *, split: str | None = None) -> list[dict]:
    """``n`` tickets of :data:`NEW_INTENT` in messages format (system prompt, ticket, label), deterministic
    given ``seed``. ``split`` draws from a disjoint part of the template space, as in :func:`task_records`:
    the demo's simulated users send ``"train"`` tickets and the new-intent accuracy is measured on ``"eval"``."""
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be None, 'train' or 'eval', got {split!r}")
    sentences, label = NEW_INTENT["sentences"], NEW_INTENT["label"]
    rng = random.Random(f"new-intent-{seed}-{split}")
    records: list[dict] = []
    seen: set[str] = set()
    for _ in range(200 * max(n, 1)):
        if len(records) == n:
            return records
        frame = _frame(rng, sentences)
        if split is not None and _frame_split("new-intent", frame) != split:
            continue
        text = _ticket(rng, sentences, frame)
        if text not in seen:
            seen.add(text)
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": label},
                    ]
                }
            )
    raise RuntimeError(f"could not generate {n} unique new-intent tickets")


def production_tickets(n: int, seed: int, *, new_share: float) -> list[dict[str, Any]]:
    """What the demo's simulated users send: ``n`` tickets, about ``new_share`` of them of :data:`NEW_INTENT`
    (from its ``"train"`` split), the rest of the original intents (fresh tickets from the whole template
    space, so some resemble eval items), in a seeded order. Each is ``{"messages": [system, user],
    "expected": label, "intent": "new" | "original"}``."""
    n_new = round(n * new_share)
    new = [(r, "new") for r in new_intent_records(n_new, seed, split="train")]
    old = [(r, "original") for r in task_records(n - n_new, seed=1000 + seed)]
    tickets = [
        {"messages": r["messages"][:-1], "expected": r["messages"][-1]["content"], "intent": kind}
        for r, kind in new + old
    ]
    random.Random(f"production-{seed}").shuffle(tickets)
    return tickets
