"""GRPO rewards (``train.rewards``): each configured reward as a checked TRL reward function.

Entry points: :func:`build_rewards` (the reward functions and weights a GRPO run trains with),
:func:`reward_problems` (what a run's preflight reports before any work: exit 2), :func:`reward_inputs` (the
rewards as the training stage's cache inputs and the version's lineage: a function's file sha256, a judge's
endpoint).

Kinds (one per ``train.rewards`` item):

* ``metric`` -- a verifiable reward: the completion scored against the prompt's ``reference`` (the final
  assistant turn of its record) by :func:`tuneloop.evaluate.suites.task_score`, the code the ``task`` suite
  gates with;
* ``function`` -- ``FILE.py:NAME``, imported from the file (relative to the config) and called as TRL calls
  reward functions: ``NAME(prompts=..., completions=..., reference=[...], **kwargs) -> list[float | None]``;
* ``judge`` -- the configured ``eval.judge`` endpoint (``kind: openai``) rates each completion 0-10 against the
  prompt and its reference (:data:`RATING_TEMPLATE`); the reward is the rating / 10;
* ``model`` -- a registered reward model (``bot-rm@champion``: a version whose lineage has ``kind: reward``,
  ``train.objective: reward``), loaded by :func:`tuneloop.train.reward.load_reward_model`; the reward is its
  score of the prompt + completion.

Every reward function is wrapped (:class:`CheckedReward`): an exception, a result that is not one number (or
``None``, TRL's "no reward for this item") per completion, or a NaN / infinite value raises :class:`RewardError`
(a :class:`~tuneloop.errors.StageError`: the training stage fails) naming the reward and the first bad item,
never a traceback and never a silent zero. An exception is traced to the first item that raises on its own.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.config import PipelineConfig, RewardSpec
from tuneloop.errors import StageError, short_repr
from tuneloop.fsutil import sha256_file
from tuneloop.registry.records import ModelVersion

RATING_TEMPLATE = (
    "You grade an assistant's answer to a user's message.\n\n[USER MESSAGE]\n{prompt}\n[/USER MESSAGE]\n{reference_block}"
    "[ANSWER]\n{answer}\n[/ANSWER]\n\nRate the answer from 0 (wrong or useless) to 10 (correct, complete and helpful)"
    "{reference_note}. Reply with the number only."
)
_NUMBER = re.compile(r"(?<![\d.])(10|\d)(?:\.\d+)?(?![\d])")


class RewardError(StageError):
    """A reward function failed or returned something unusable (the training stage fails with this message)."""


@dataclass(frozen=True)
class Reward:
    """One configured reward: its place in ``train.rewards``, its name in the metrics, its weight."""

    index: int
    spec: RewardSpec
    name: str  # TRL logs ``rewards/<name>/mean``

    @property
    def where(self) -> str:
        return f"train.rewards[{self.index}] ({self.spec.label})"


def rewards_of(cfg: PipelineConfig) -> list[Reward]:
    """The configured rewards with unique metric names: the metric (``exact``), the function's name (``score``),
    ``judge``, the reward model's name; a name taken already gets ``_<index>``."""
    out: list[Reward] = []
    taken: set[str] = set()
    for i, spec in enumerate(cfg.train.rewards):
        if spec.kind == "function":
            name = spec.function_parts()[1]
        elif spec.kind == "model":
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(spec.model).split("@")[0].split(":")[0]) or "model"
        elif spec.kind == "judge":
            name = "judge"
        else:
            name = str(spec.metric)
        if name in taken:
            name = f"{name}_{i}"
        taken.add(name)
        out.append(Reward(i, spec, name))
    return out


# --------------------------------------------------------------------------------------------- checks


def reward_problems(cfg: PipelineConfig) -> list[str]:
    """Problems of ``train.rewards`` found before any work (each naming its key): a function file that is
    missing, cannot be imported or lacks the function; a judge reward without an OpenAI-compatible
    ``eval.judge``; a reward model ref that names no version or a version that is not a reward model."""
    problems = []
    for r in rewards_of(cfg):
        key = f"train.rewards[{r.index}]"
        if r.spec.kind == "function":
            try:
                load_function(r.spec)
            except RewardError as exc:
                problems.append(f"{key}.function: {exc}")
        elif r.spec.kind == "judge":
            j = cfg.eval.judge
            if j.kind != "openai":
                problems.append(
                    f"{key}.judge: a judge reward asks eval.judge's endpoint for a rating, but eval.judge.kind is "
                    f"{j.kind}; set eval.judge.kind: openai with url and model (an OpenAI-compatible endpoint)"
                )
            else:
                problems += [
                    f"{key}.judge: needs eval.judge.{k} (kind: openai)" for k in ("url", "model") if not getattr(j, k)
                ]
        elif r.spec.kind == "model":
            try:
                reward_version(cfg, str(r.spec.model))
            except Exception as exc:  # noqa: BLE001 - the registry's own message names what exists
                problems.append(f"{key}.model: {exc}")
        elif r.spec.kind == "metric" and r.spec.metric == "regex" and r.spec.pattern is not None:
            try:
                re.compile(r.spec.pattern)
            except re.error as exc:
                problems.append(f"{key}.pattern: not a valid regex ({exc}); fix the pattern")
    return problems


def load_function(spec: RewardSpec) -> Callable[..., Any]:
    """Import a ``function`` reward's file and return the function (RewardError says what is wrong, where)."""
    file, name = spec.function_parts()
    shown = spec._written or spec.function
    path = Path(file)
    if not path.is_file():
        raise RewardError(f"{shown}: file not found: {path} (a Python file relative to the config's directory)")
    digest = sha256_file(path)
    module_name = f"tuneloop_reward_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest[:12]}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise RewardError(f"{shown}: {path} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.parent))  # the file may import its neighbours
        try:
            loader_spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: BLE001 - the user's module: any failure is reported, not raised
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise RewardError(
                f"{shown}: {_user_line(exc, path)}{type(exc).__name__}: {exc}; fix the file so that "
                f"`python {path.name}` imports"
            ) from None
        finally:
            try:
                sys.path.remove(str(path.parent))
            except ValueError:
                pass
        sys.modules[module_name] = module
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(
            n
            for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", "") == module_name
        )
        have = f" (it defines: {', '.join(defined)})" if defined else ""
        raise RewardError(f"{shown}: {path.name} has no function {name!r}{have}")
    if not callable(fn):
        raise RewardError(f"{shown}: {name} in {path.name} is a {type(fn).__name__}, not a function")
    return fn


def _user_line(exc: BaseException, path: Path) -> str:
    """``rewards.py:3: `` -- the last line of the user's file in the exception's traceback (or its syntax error)."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"{path.name}:{exc.lineno}: "
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    return f"{path.name}:{line}: " if line else ""


# ------------------------------------------------------------------------------------------ lineage


def reward_inputs(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The rewards as cache inputs and lineage: kind, name, weight, and per kind the metric (with pattern and
    threshold), the function as written with its file's sha256, the judge's endpoint and model, the model ref."""
    out = []
    for r in rewards_of(cfg):
        s = r.spec
        row: dict[str, Any] = {"kind": s.kind, "name": r.name, "weight": s.weight}
        if s.kind == "metric":
            row["metric"] = s.metric
            row.update({k: v for k, v in (("pattern", s.pattern), ("threshold", s.threshold)) if v is not None})
        elif s.kind == "function":
            file, _ = s.function_parts()
            row["function"] = s._written or s.function
            row["sha256"] = sha256_file(Path(file)) if Path(file).is_file() else None
        elif s.kind == "judge":
            row["judge"] = {
                "kind": cfg.eval.judge.kind,
                "url": cfg.eval.judge.url,
                "model": cfg.eval.judge.model,
                "template_sha256": _sha(RATING_TEMPLATE),
            }
        else:
            row["model"] = s.model
            try:  # the version the ref names now, and its artifact: an alias that moves retrains
                version = reward_version(cfg, str(s.model))
                row.update(version=version.ref, artifact_sha256=version.artifact_digest)
            except Exception:  # noqa: BLE001 - reported by the preflight (reward_problems)
                pass
        out.append(row)
    return out


def reward_version(cfg: PipelineConfig, ref: str) -> ModelVersion:
    """The registered version a ``model`` reward names; InputError when it is not a reward model (its lineage has no
    ``kind: reward``), the registry's error when the ref names no version."""
    from tuneloop.errors import InputError
    from tuneloop.registry.api import open_registry
    from tuneloop.workspace import Workspace

    version = open_registry(cfg, Workspace.for_config(cfg)).resolve(ref)
    lineage = version.lineage or {}
    if lineage.get("kind") != "reward":
        what = lineage.get("objective") or (lineage.get("config") or {}).get("train", {}).get("objective") or "sft"
        raise InputError(
            f"{version.ref} is not a reward model: its lineage has no `kind: reward` (it was trained with "
            f"train.objective {what}); name a version trained with train.objective: reward"
        )
    return version


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------ building


def build_rewards(cfg: PipelineConfig) -> tuple[list[CheckedReward], list[float]]:
    """The checked reward functions of ``train.rewards`` and their weights, for TRL's GRPOTrainer."""
    funcs, weights = [], []
    for r in rewards_of(cfg):
        s = r.spec
        if s.kind == "metric":
            fn: Callable[..., Any] = MetricReward(str(s.metric), s.pattern, s.threshold)
        elif s.kind == "function":
            fn = load_function(s)
        elif s.kind == "judge":
            fn = JudgeReward(cfg.eval.judge)
        else:
            fn = ModelReward(cfg, str(s.model))
        funcs.append(CheckedReward(r, fn))
        weights.append(s.weight)
    return funcs, weights


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes a conversational completion as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def prompt_text(prompt: Any) -> str:
    """The last user turn of a conversational prompt (or the prompt itself)."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str((users or prompt)[-1].get("content", "")) if (users or prompt) else ""
    return str(prompt)


class MetricReward:
    """A task metric of each completion against its reference (the ``task`` suite's scoring code)."""

    def __init__(self, metric: str, pattern: str | None = None, threshold: float | None = None):
        self.metric, self.pattern, self.threshold = metric, pattern, threshold

    def __call__(self, prompts, completions, reference=None, **_: Any) -> list[float]:
        from tuneloop.evaluate.suites import task_score

        if reference is None:
            raise RewardError(
                "the training prompts carry no `reference` (the final assistant turn): re-run preprocessing"
            )
        return [
            task_score(self.metric, completion_text(c), ref, self.pattern, self.threshold)
            for c, ref in zip(completions, reference, strict=True)
        ]


class JudgeReward:
    """``eval.judge``'s OpenAI-compatible endpoint rates each completion 0-10; the reward is the rating / 10.

    The same retries, timeout and API key as the evaluation's judge; a reply with no rating after the retries
    raises RewardError."""

    def __init__(self, judge_cfg):
        import os

        import httpx

        key = os.environ.get(judge_cfg.api_key_env) if judge_cfg.api_key_env else None
        if judge_cfg.api_key_env and not key:
            raise RewardError(
                f"eval.judge.api_key_env: environment variable {judge_cfg.api_key_env} is not set (the judge reward needs it)"
            )
        self.url, self.model, self.max_retries = judge_cfg.url.rstrip("/"), judge_cfg.model, judge_cfg.max_retries
        self.client = httpx.Client(
            timeout=judge_cfg.timeout_s, headers={"Authorization": f"Bearer {key}"} if key else {}
        )

    def rate(self, prompt: str, answer: str, reference: str | None) -> float:
        import httpx

        block = f"\n[REFERENCE ANSWER]\n{reference}\n[/REFERENCE ANSWER]\n" if reference else "\n"
        note = ", compared with the reference answer" if reference else ""
        text = RATING_TEMPLATE.format(prompt=prompt, reference_block=block, answer=answer, reference_note=note)
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                r = self.client.post(
                    f"{self.url}/chat/completions",
                    json={
                        "model": self.model,
                        "messages": [{"role": "user", "content": text}],
                        "temperature": 0,
                        "max_tokens": 8,
                    },
                )
                if r.status_code >= 500 or r.status_code == 429:
                    last = f"HTTP {r.status_code}"
                    continue
                r.raise_for_status()
                reply = r.json()["choices"][0]["message"]["content"]
            except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            rating = parse_rating(reply)
            if rating is not None:
                return rating / 10.0
            last = f"no 0-10 rating in the reply {str(reply)[:80]!r}"
        raise RewardError(
            f"judge endpoint {self.url} (model {self.model}) gave no rating after {self.max_retries + 1} tries: {last}"
        )

    def __call__(self, prompts, completions, reference=None, **_: Any) -> list[float]:
        refs = reference if reference is not None else [None] * len(completions)
        return [
            self.rate(prompt_text(p), completion_text(c), ref)
            for p, c, ref in zip(prompts, completions, refs, strict=True)
        ]


class ModelReward:
    """A registered reward model's score of each prompt + completion (:mod:`tuneloop.train.reward`)."""

    def __init__(self, cfg: PipelineConfig, ref: str):
        from tuneloop.registry.api import open_registry
        from tuneloop.train.reward import load_reward_model
        from tuneloop.workspace import Workspace

        try:
            self.model = load_reward_model(ref, registry=open_registry(cfg, Workspace.for_config(cfg)))
        except Exception as exc:  # noqa: BLE001 - a ref the preflight accepted but that cannot be loaded now
            raise RewardError(f"reward model {ref}: {exc}") from None

    def __call__(self, prompts, completions, **_: Any) -> list[float]:
        return self.model.score(prompts, completions)


def parse_rating(text: str) -> float | None:
    """The first number from 0 to 10 in a judge's reply (``"7"``, ``"Rating: 8/10"``), or None."""
    m = _NUMBER.search(text or "")
    return float(m.group(0)) if m and 0.0 <= float(m.group(0)) <= 10.0 else None


class CheckedReward:
    """A reward function that fails loudly: TRL's reward-function call, with the result checked on every call
    (one real number or ``None`` per completion; NaN and infinity are refused)."""

    def __init__(self, reward: Reward, fn: Callable[..., Any]):
        self.reward, self.fn = reward, fn
        self.__name__ = reward.name  # TRL's name for it: rewards/<name>/mean

    def __call__(self, prompts, completions, **kwargs: Any) -> list[float | None]:
        try:
            out = self.fn(prompts=prompts, completions=completions, **kwargs)
        except RewardError as exc:
            raise RewardError(f"{self.reward.where}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the user's function: reported with the item, not as a traceback
            j, item_exc = self._first_raising(prompts, completions, kwargs)
            exc = item_exc or exc
            at = (
                f" on item {j} ({self._item(prompts, completions, kwargs, j)})"
                if j is not None
                else f" on a batch of {len(completions)} completions (each alone scored without error)"
            )
            raise RewardError(f"{self.reward.where} raised {type(exc).__name__}: {exc}{at}; fix the function") from None
        return self.check(out, prompts, completions, kwargs)

    def check(self, out: Any, prompts, completions, kwargs: dict[str, Any]) -> list[float | None]:
        n = len(completions)
        if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__") or not hasattr(out, "__iter__"):
            raise RewardError(
                f"{self.reward.where} returned {type(out).__name__} {short_repr(out, 60)}, not a list of one number per "
                f"completion ({n} here); return e.g. [1.0, 0.0, ...]"
            )
        values = list(out)
        if len(values) != n:
            raise RewardError(
                f"{self.reward.where} returned {len(values)} rewards for {n} completions; return one number per "
                f"completion (first item: {self._item(prompts, completions, kwargs, 0)})"
            )
        clean: list[float | None] = []
        for j, v in enumerate(values):
            if v is None:
                clean.append(None)
                continue
            x = _number(v)
            if x is None or not math.isfinite(x):
                what = f"{x}" if x is not None else f"{type(v).__name__} {short_repr(v, 60)}, not a number"
                raise RewardError(
                    f"{self.reward.where} returned {what} for item {j} ({self._item(prompts, completions, kwargs, j)}); "
                    f"return a finite number (or None for no reward)"
                )
            clean.append(x)
        return clean

    def _first_raising(self, prompts, completions, kwargs: dict[str, Any]) -> tuple[int | None, Exception | None]:
        """The first item the function raises on when called with that item alone (and the exception)."""
        for j in range(len(completions)):
            one = {k: [v[j]] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
            try:
                self.fn(prompts=[prompts[j]], completions=[completions[j]], **one)
            except Exception as exc:  # noqa: BLE001
                return j, exc
        return None, None

    @staticmethod
    def _item(prompts, completions, kwargs: dict[str, Any], j: int) -> str:
        parts = [
            f"prompt {short_repr(prompt_text(prompts[j]), 60)}",
            f"completion {short_repr(completion_text(completions[j]), 60)}",
        ]
        ref = kwargs.get("reference")
        if isinstance(ref, list) and j < len(ref):
            parts.append(f"reference {short_repr(ref[j], 60)}")
        return ", ".join(parts)


def _number(v: Any) -> float | None:
    """``v`` as a float when it is a real number (Python, NumPy or a 0-d tensor), else None."""
    if isinstance(v, numbers.Real):
        return float(v)
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        item = v.item()
        return float(item) if isinstance(item, numbers.Real) else None
    return None
