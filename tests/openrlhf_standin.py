"""A stand-in for OpenRLHF's DeepSpeed launch (``deepspeed --num_gpus N --module openrlhf.cli.train_X ARGS``), used
by tests/test_openrlhf_export.py where OpenRLHF itself cannot run (no GPU, no deepspeed).

    python tests/openrlhf_standin.py --num_gpus N --module openrlhf.cli.train_sft|train_dpo|train_rm ARGS...
    python tests/openrlhf_standin.py --ppo ARGS...     (for ``python3 -m openrlhf.cli.train_ppo_ray ARGS``: see ``ppo``)

It does what can be done faithfully on a CPU, with OpenRLHF's own code taken from its installed sources:
1. parses ARGS with that module's own argument parser and runs its checks after parsing (exit 2 on a rejection);
2. reads the training and eval datasets with the keys the arguments name, through OpenRLHF's own
   ``preprocess_data`` and the chat template the arguments select, and fails on a record it cannot use;
3. writes the final model to ``--ckpt.output_dir`` as OpenRLHF's ``strategy.save_model`` does: a PEFT adapter
   (LoRA: ``--ds.lora.rank`` > 0) plus the base ``config.json``, or the full model; for ``train_rm`` OpenRLHF's own
   ``RewardModel`` class (from ``get_llm_for_sequence_regression``) with its value head initialised as OpenRLHF
   does; and the tokenizer. It does not train (no optimizer step).

With ``OPENRLHF_STANDIN_LOG`` set, writes there (JSON) the parsed arguments and, for a reward model, the score
OpenRLHF's ``RewardModel.forward`` gives the first held-out pair, to compare with what tuneloop reads back.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).parent))

from openrlhf_parser import Rejected, openrlhf_args, openrlhf_function  # noqa: E402


def ppo(rest: list[str]) -> int:
    """``python3 -m openrlhf.cli.train_ppo_ray ARGS`` (GRPO): the arguments through its parser and checks, the prompt
    data through its PromptDataset's ``preprocess_data``, each prompt's reference answer (as a generation ending with
    EOS) scored through its ``SingleTurnAgentExecutor`` with the ``--reward.remote_url`` file (a missing reward fails,
    as OpenRLHF would have no reward), then the actor saved as ``save_model`` saves it (a PEFT adapter with LoRA)."""
    import asyncio
    import copy
    import itertools
    import logging
    from types import SimpleNamespace

    module = "openrlhf.cli.train_ppo_ray"
    try:
        args = openrlhf_args(module, rest)
    except Rejected as exc:
        print(f"stand-in train_ppo_ray: {exc}", file=sys.stderr)
        return 2
    print(f"stand-in OpenRLHF: {module} accepted {len(rest)} arguments", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.actor.model_name_or_path)
    preprocess = openrlhf_function(
        "datasets/prompts_dataset.py",
        "preprocess_data",
        copy=copy,
        _str_to_content_list=openrlhf_function("datasets/prompts_dataset.py", "_str_to_content_list"),
    )
    executor = None
    if args.reward.remote_url:
        cls = openrlhf_function(
            "utils/agent.py",
            "SingleTurnAgentExecutor",
            AgentExecutorBase=object,
            asyncio=asyncio,
            deepcopy=copy.deepcopy,
            cycle=itertools.cycle,
            logger=logging.getLogger("openrlhf"),
            aiohttp=None,
        )
        executor = cls(args.reward.remote_url)

    class Engine:  # "generates" the reference answer and EOS
        def __init__(self, ids):
            self.ids = ids

        async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
            return SimpleNamespace(
                outputs=[
                    SimpleNamespace(token_ids=self.ids, text=tok.decode(self.ids), finish_reason="stop", logprobs=None)
                ]
            )

    rewards = []
    for n, line in enumerate(Path(args.data.prompt_dataset).read_text(encoding="utf-8").splitlines(), 1):
        rec = json.loads(line)
        prompt, label = preprocess(
            rec,
            args.data.input_template,
            args.data.input_key,
            args.data.label_key,
            tok.apply_chat_template if args.data.apply_chat_template else None,
        )
        if executor is not None:
            ids = tok(rec["reference"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out = asyncio.run(
                executor.execute(
                    prompt,
                    label,
                    SimpleNamespace(max_tokens=args.rollout.max_new_tokens, logprobs=None),
                    args.data.max_len,
                    tok,
                    Engine(ids),
                )
            )
            if out["reward"] is None:
                print(f"stand-in OpenRLHF: {args.data.prompt_dataset}:{n}: no reward", file=sys.stderr)
                return 1
            rewards.append(out["reward"])
    print(
        f"stand-in OpenRLHF: {len(rewards)} reference answers scored through the reward function, mean "
        f"{sum(rewards) / max(len(rewards), 1):.3f}",
        flush=True,
    )
    out_dir = Path(args.ckpt.output_dir)
    model = AutoModelForCausalLM.from_pretrained(args.actor.model_name_or_path)
    if args.ds.lora.rank > 0:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                r=args.ds.lora.rank,
                lora_alpha=args.ds.lora.alpha,
                target_modules=args.ds.lora.target_modules,
                lora_dropout=args.ds.lora.dropout,
                bias="none",
            ),
        )
    model.save_pretrained(out_dir)
    model.config.to_json_file(str(out_dir / "config.json"))
    tok.save_pretrained(out_dir)
    if os.environ.get("OPENRLHF_STANDIN_LOG"):
        Path(os.environ["OPENRLHF_STANDIN_LOG"]).write_text(
            json.dumps({"module": module, "argv": rest, "rewards": rewards})
        )
    print(f"stand-in OpenRLHF: saved the model to {out_dir}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--ppo"]:
        return ppo(argv[1:])
    if len(argv) < 4 or argv[0] != "--num_gpus" or argv[2] != "--module":
        print(f"stand-in deepspeed: expected --num_gpus N --module MODULE ARGS..., got {argv[:4]}", file=sys.stderr)
        return 2
    module, rest = argv[3], argv[4:]
    try:
        args = openrlhf_args(module, rest)
    except Rejected as exc:
        print(f"stand-in deepspeed: {exc}", file=sys.stderr)
        return 2
    print(f"stand-in OpenRLHF: {module} accepted {len(rest)} arguments", flush=True)

    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    base, out = args.model.model_name_or_path, Path(args.ckpt.output_dir)
    tok = AutoTokenizer.from_pretrained(base)
    if args.data.tokenizer_chat_template:
        tok.chat_template = args.data.tokenizer_chat_template
    template = tok.apply_chat_template if args.data.apply_chat_template else None
    reward = module.endswith("train_rm")
    if module.endswith("train_sft"):
        preprocess = openrlhf_function("datasets/sft_dataset.py", "preprocess_data")
    else:
        preprocess = openrlhf_function(
            "datasets/reward_dataset.py", "preprocess_data", exist_and_not_none=lambda d, k: k in d and d[k] is not None
        )
    pairs = []
    for path in (args.data.dataset, args.eval.dataset):
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            rec = json.loads(line)
            try:
                if module.endswith("train_sft"):
                    prompt, response = preprocess(
                        rec, args.data.input_template, args.data.input_key, args.data.output_key, template
                    )
                    assert prompt and response and rec[args.data.input_key][-1]["content"] in response, (
                        "empty prompt or answer"
                    )
                else:
                    prompt, chosen, rejected, _ = preprocess(
                        rec,
                        args.data.input_template,
                        args.data.prompt_key,
                        args.data.chosen_key,
                        args.data.rejected_key,
                        template,
                        not reward,
                    )
                    assert prompt and rec[args.data.chosen_key][-1]["content"] in chosen, (
                        "the chosen answer is not rendered"
                    )
                    assert rec[args.data.rejected_key][-1]["content"] in rejected, "the rejected answer is not rendered"
                    pairs.append(rec)
            except (KeyError, TypeError, AssertionError) as exc:
                print(
                    f"stand-in OpenRLHF: {path}:{n}: cannot use this record ({type(exc).__name__}: {exc})",
                    file=sys.stderr,
                )
                return 1
    print("stand-in OpenRLHF: every record read through OpenRLHF's preprocess_data", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    log: dict = {"module": module, "argv": rest}
    if reward:
        config = AutoConfig.from_pretrained(base)
        config.normalize_reward = False
        base_class = AutoModel._model_mapping[type(config)]
        get_reward_model = openrlhf_function(
            "models/model.py", "_get_reward_model", nn=nn, torch=torch, Optional=Optional, AutoConfig=AutoConfig
        )
        cls = get_reward_model(base_class.__base__, base_class, args.ds.value_head_prefix, False)
        model = cls.from_pretrained(base, config=config)
        torch.manual_seed(args.train.seed)
        getattr(model, args.ds.value_head_prefix).weight.data.normal_(mean=0.0, std=1 / (config.hidden_size + 1))
        model.eval()
        model.save_pretrained(out)
        model.config.to_json_file(str(out / "config.json"))
        from tuneloop.train.reward import reward_input_ids

        first = pairs[-1]
        ids = reward_input_ids(tok, first["messages"], first["chosen"])
        with torch.no_grad():
            score = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        log.update(
            pair=first,
            score=float(score[0]),
            architectures=json.loads((out / "config.json").read_text())["architectures"],
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        if args.ds.lora.rank > 0:
            from peft import LoraConfig, TaskType, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    task_type=TaskType.CAUSAL_LM,
                    r=args.ds.lora.rank,
                    lora_alpha=args.ds.lora.alpha,
                    target_modules=args.ds.lora.target_modules,
                    lora_dropout=args.ds.lora.dropout,
                    bias="none",
                ),
            )
        model.save_pretrained(out)
        model.config.to_json_file(str(out / "config.json"))
    tok.save_pretrained(out)
    if os.environ.get("OPENRLHF_STANDIN_LOG"):
        Path(os.environ["OPENRLHF_STANDIN_LOG"]).write_text(json.dumps(log))
    print(f"stand-in OpenRLHF: saved the model to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
