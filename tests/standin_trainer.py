"""A stand-in for an external trainer (Axolotl, LLaMA-Factory, ...), used by tests/test_external.py.

    python tests/standin_trainer.py --base MODEL --train FILE --out DIR [--steps N] [--seed S] [--fail]

It really trains: a PEFT LoRA adapter on the canonical `messages` records with a transformers Trainer, then
saves the adapter, the tokenizer and trainer_state.json into DIR, as those tools do.
"""

import argparse
import json
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--train", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--fail", action="store_true", help="exit with status 3 after printing a line")
a = ap.parse_args()
print(f"stand-in trainer: base={a.base} train={a.train}", flush=True)
if a.fail:
    print("CUDA out of memory (pretend)", flush=True)
    sys.exit(3)

tok = AutoTokenizer.from_pretrained(a.base)
records = [json.loads(line) for line in open(a.train, encoding="utf-8") if line.strip()]
texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
enc = [tok(t, add_special_tokens=False, truncation=True, max_length=96)["input_ids"] for t in texts]
data = [{"input_ids": ids, "labels": ids} for ids in enc]


def collate(batch):
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), tok.pad_token_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


model = get_peft_model(
    AutoModelForCausalLM.from_pretrained(a.base),
    LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
)
args = TrainingArguments(
    output_dir=a.out,
    max_steps=a.steps,
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    seed=a.seed,
    disable_tqdm=True,
    remove_unused_columns=False,
)
trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
trainer.train()
trainer.save_model(a.out)
trainer.save_state()
print("stand-in trainer: done", flush=True)
