"""The GRPO part of a run's report: rewards and completion length per step, and the reward-hacking flags.

Entry points: :func:`rewards_section` (HTML for ``report.html``, empty for a run that logged no rewards) and
:func:`hacking_flags` (the flags as sentences). Both read only the run's ``train_metrics.jsonl`` rows and its
stage metrics.

Flags (reward hacking is the classic failure of RL fine-tuning: the policy finds what the reward pays for
without doing the task):

* the mean reward rose (mean of the last third of the steps above the first third's) while the task suite's
  accuracy of the candidate is below the base's (or the champion's);
* most completions reached ``train.max_completion_length`` without ending (``completions/clipped_ratio`` over
  0.5 on average over the last third of the steps): the reward may pay for length, or answers are cut off.
"""

from __future__ import annotations

from html import escape
from typing import Any

from tuneloop.report.style import fmt_number

COLOURS = ("#1a73e8", "#e8710a", "#188038", "#d93025", "#9334e6", "#12b5cb")
CLIPPED_SHARE = 0.5


def _thirds(values: list[float]) -> tuple[float, float]:
    """Means of the first and last third (at least one value each)."""
    k = max(1, len(values) // 3)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def reward_names(rows: list[dict[str, Any]]) -> list[str]:
    """The reward functions' names, in the order the rows first show them (``rewards/<name>/mean``)."""
    names: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith("rewards/") and k.endswith("/mean") and k[8:-5] not in names:
                names.append(k[8:-5])
    return names


def hacking_flags(rows: list[dict[str, Any]], training: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    """The reward-hacking flags of a GRPO run, as sentences (none: nothing was flagged)."""
    flags = []
    rewards = [r["reward"] for r in rows if isinstance(r.get("reward"), (int, float))]
    acc, base = evaluation.get("accuracy"), evaluation.get("base_accuracy")
    if len(rewards) >= 2 and isinstance(acc, (int, float)) and isinstance(base, (int, float)):
        first, last = _thirds(rewards)
        if last > first and acc < base:
            against = evaluation.get("against", "base")
            flags.append(
                f"The mean reward rose ({fmt_number(first)} in the first third of the steps, {fmt_number(last)} in the "
                f"last) while the task accuracy fell ({fmt_number(base)} for the {against}, {fmt_number(acc)} for the "
                "candidate): the policy may be earning the reward without doing the task. Check the reward "
                "against the task's references, or add the task metric as a reward."
            )
    clipped = [
        r["completions/clipped_ratio"] for r in rows if isinstance(r.get("completions/clipped_ratio"), (int, float))
    ]
    if clipped:
        share = _thirds(clipped)[1]
        if share > CLIPPED_SHARE:
            limit = training.get("max_completion_length")
            flags.append(
                f"{share:.0%} of the completions of the last steps reached max_completion_length "
                f"({limit if limit is not None else '?'} tokens) without ending: the reward may pay for length, or "
                "answers are cut off. Raise train.max_completion_length or penalise length in the reward."
            )
    return flags


def _lines_svg(
    series: list[tuple[str, list[tuple[float, float]]]],
    *,
    label: str,
    ceiling: float | None = None,
    w: int = 640,
    h: int = 220,
) -> str:
    """A line chart of several series (name, points) with a legend; ``ceiling`` draws a dashed line."""
    pts = [p for _, s in series for p in s]
    if len({x for x, _ in pts}) < 2:
        return "<p>(fewer than two logged steps)</p>"
    xs, ys = [p[0] for p in pts], [p[1] for p in pts] + ([ceiling] if ceiling is not None else [])
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = lambda x: 50 + (x - x0) / max(x1 - x0, 1e-9) * (w - 60)  # noqa: E731
    sy = lambda y: 10 + (y1 - y) / (y1 - y0) * (h - 50)  # noqa: E731
    out = [f'<svg width="{w}" height="{h}" role="img" aria-label="{escape(label)}">']
    for i, (name, s) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"><title>{escape(name)}</title></polyline>'
        )
        out.append(f'<text x="{50 + i * 150}" y="{h - 4}" font-size="11" fill="{colour}">{escape(name)}</text>')
    if ceiling is not None:
        out.append(
            f'<line x1="50" x2="{w - 10}" y1="{sy(ceiling):.1f}" y2="{sy(ceiling):.1f}" stroke="#888" stroke-dasharray="4 3"/>'
        )
    out.append(
        f'<text x="2" y="14" font-size="11">{y1:.3g}</text><text x="2" y="{h - 40}" font-size="11">{y0:.3g}</text>'
        f'<text x="50" y="{h - 20}" font-size="11">step {x0:g}</text><text x="{w - 70}" y="{h - 20}" font-size="11">step {x1:g}</text>'
    )
    out.append("</svg>")
    return "".join(out)


def rewards_section(rows: list[dict[str, Any]], stages: dict[str, Any]) -> str:
    """HTML: the mean reward per function per step, the completion length (dashed: max_completion_length) and the
    reward-hacking flags; ``""`` when the rows carry no rewards (not a GRPO run)."""
    names = reward_names(rows)
    if not names:
        return ""
    training = stages.get("training", {}).get("metrics", {})
    evaluation = stages.get("evaluation", {}).get("metrics", {})
    series = [
        (
            f"rewards/{n}/mean",
            [(r["step"], r[f"rewards/{n}/mean"]) for r in rows if isinstance(r.get(f"rewards/{n}/mean"), (int, float))],
        )
        for n in names
    ]
    lengths = [
        (r["step"], r["completions/mean_length"])
        for r in rows
        if isinstance(r.get("completions/mean_length"), (int, float))
    ]
    parts = ["<h2>Rewards per step</h2>", _lines_svg(series, label="mean reward per function per step")]
    if lengths:
        parts += [
            "<h2>Completion length per step</h2><p>Mean tokens per completion; dashed: train.max_completion_length.</p>",
            _lines_svg(
                [("completions/mean_length", lengths)],
                label="mean completion length per step",
                ceiling=training.get("max_completion_length"),
            ),
        ]
    kl = [(r["step"], r["kl"]) for r in rows if isinstance(r.get("kl"), (int, float))]
    if kl:
        parts += ["<h2>KL to the reference per step</h2>", _lines_svg([("kl", kl)], label="KL per step")]
    flags = hacking_flags(rows, training, evaluation)
    parts.append("<h2>Reward hacking checks</h2>")
    if flags:
        parts.append("<ul>" + "".join(f"<li class='failed'>{escape(f)}</li>" for f in flags) + "</ul>")
    else:
        measured = isinstance(evaluation.get("accuracy"), (int, float)) and isinstance(
            evaluation.get("base_accuracy"), (int, float)
        )
        first = (
            "the reward did not rise while the task accuracy fell"
            if measured
            else "(the task accuracy was not measured for both models, so a reward rising while it falls was not checked)"
        )
        parts.append(f"<p>Nothing flagged: {first}; most completions ended before max_completion_length.</p>")
    return "\n".join(parts)
