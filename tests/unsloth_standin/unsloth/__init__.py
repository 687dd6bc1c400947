"""A stand-in for the `unsloth` package (which needs a CUDA GPU), used by tests/test_unsloth_backend.py.

It takes exactly the keywords tuneloop passes to Unsloth 2026.8.19's ``FastLanguageModel.from_pretrained`` and
``get_peft_model`` (an unknown keyword is a TypeError, as it would be for Unsloth's own named parameters) and does what
they do on the CPU without Unsloth's kernels: transformers loads the model, PEFT wraps it in LoRA. So the rest of
``train.backend: unsloth`` (the child process, TRL's trainers on the plan's arguments, checkpoints, the saved adapter,
metrics) runs for real here. It records which of transformers/TRL/PEFT were imported before it.
"""

import sys

IMPORTED_BEFORE = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
__version__ = "0.0-standin"
print(f"unsloth stand-in imported; before it: {IMPORTED_BEFORE}", flush=True)


class FastLanguageModel:
    @staticmethod
    def from_pretrained(
        model_name,
        max_seq_length=2048,
        dtype=None,
        load_in_4bit=True,
        full_finetuning=False,
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_exact_model_name=False,
        float32_mixed_precision=None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if load_in_4bit:
            raise RuntimeError("stand-in: 4-bit loading needs bitsandbytes on a CUDA GPU")
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
        model.max_seq_length = max_seq_length
        if full_finetuning and use_gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model, AutoTokenizer.from_pretrained(model_name)

    @staticmethod
    def get_peft_model(
        model,
        r=16,
        target_modules=None,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
        **kwargs,
    ):
        from peft import LoraConfig, get_peft_model

        if not isinstance(target_modules, list):
            raise TypeError(f"Unsloth iterates target_modules as a list; got {target_modules!r}")
        if use_gradient_checkpointing:
            model.gradient_checkpointing_enable()
        lora = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            bias=bias,
            use_rslora=use_rslora,
            task_type="CAUSAL_LM",
            **kwargs,
        )
        return get_peft_model(model, lora)
