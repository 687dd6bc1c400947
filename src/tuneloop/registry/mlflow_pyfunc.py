"""MLflow's own loader for what tuneloop registers: ``mlflow.pyfunc.load_model("models:/bot@champion")``.

Every version registered on an MLflow server carries an ``MLmodel`` file with the ``python_function``
flavor whose ``loader_module`` is this module (this needs ``tuneloop`` importable where the model is
loaded; the transformers flavor is not used because PEFT adapters on a separately stored base do not fit it).
MLflow downloads the run, then calls :func:`_load_pyfunc` with the ``artifact/`` directory and the flavor's
``model_config`` (artifact digest, kind, base model and its digest). Loading re-checks the artifact's
sha256 digest and, for an adapter, that the base model is the one it was trained on.

``predict`` takes a string, a list of strings, a ``{"prompt": ...}`` dict or a pandas DataFrame (the
``prompt`` column, else the first one) and returns one greedy completion per prompt, each prompt sent as a
user turn through the model's chat template. ``params={"max_new_tokens": N}`` sets the length (default 64).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneloop.errors import IntegrityError

LOADER_MODULE = "tuneloop.registry.mlflow_pyfunc"
DATA_DIR = "artifact"


class TuneloopPyfuncModel:
    """A loaded tuneloop version behind MLflow's pyfunc ``predict``."""

    def __init__(self, model, tokenizer, meta: dict[str, Any]):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from tuneloop.modeling import generate

        prompts = _prompts(model_input)
        max_new = int((params or {}).get("max_new_tokens", 64))
        outs = generate(
            self.model, self.tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=max_new
        )
        return [o["text"] for o in outs]


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", next(iter(model_input.values()), []))
        return [value] if isinstance(value, str) else [str(v) for v in value]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a pandas DataFrame
        col = "prompt" if "prompt" in columns else columns[0]
        return [str(v) for v in model_input[col].tolist()]
    return [str(v) for v in model_input]


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> TuneloopPyfuncModel:
    """What ``mlflow.pyfunc.load_model`` calls: verify the downloaded artifact, then load it (with its base)."""
    from tuneloop.fsutil import sha256_dir
    from tuneloop.modeling import load_causal_lm, load_tokenizer
    from tuneloop.registry.lineage import check_base

    meta = dict(model_config or {})
    path = Path(data_path)
    digest = sha256_dir(path)
    if meta.get("artifact_digest") and digest != meta["artifact_digest"]:
        raise IntegrityError(
            f"the artifact MLflow downloaded to {path} has sha256 {digest[:16]}..., registered "
            f"{meta['artifact_digest'][:16]}...: the copy in the MLflow artifact store was modified; restore it"
        )
    if meta.get("artifact_kind") == "adapter":
        base = check_base(meta.get("base_model") or "", meta.get("base_digest"))
        model = load_causal_lm(base, adapter=str(path))
    else:
        model = load_causal_lm(str(path))
    tok_src = path if (path / "tokenizer_config.json").is_file() else Path(meta.get("base_model") or path)
    return TuneloopPyfuncModel(model, load_tokenizer(str(tok_src)), meta)


def write_mlmodel(dest: Path, *, run_id: str, meta: dict[str, Any]) -> None:
    """Write the ``MLmodel`` file that makes ``dest`` (a run's artifact root) loadable by ``mlflow.pyfunc``."""
    import platform

    from mlflow.models import Model, ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
    )
    m = Model(
        run_id=run_id,
        signature=signature,
        metadata={"tuneloop": {k: v for k, v in meta.items() if isinstance(v, (str, int))}},
    )
    add_to_model(
        m, loader_module=LOADER_MODULE, data=DATA_DIR, model_config=meta, python_version=platform.python_version()
    )
    m.save(str(Path(dest) / "MLmodel"))
