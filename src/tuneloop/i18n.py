"""The demo's printed summary in English and Simplified Chinese: one message table, two languages.

Entry points: :func:`resolve_lang` (``--lang`` or the locale -> ``"en"`` / ``"zh"``) and :func:`msg` (a message
of the table, its ``{placeholders}`` filled). ``tuneloop demo --lang zh`` (or ``LC_ALL`` / ``LC_MESSAGES`` /
``LANG`` starting with ``zh`` when ``--lang`` is not given) prints through it: the stage table, the served
tickets, the closed loop's story and closing section, the time and the report's path.

What stays as it is in both languages: stage names, gate names, metric keys, model refs, run ids, numbers,
paths, and the decisions' actions (``step_up``, ``promote``). What is not translated this round: logs, progress
bars, errors, and sentences made by the library (the drift check's summary, a rollout decision's reason); the
JSON of ``--json`` is the same in every language. The web UI's catalogs are separate
(``tuneloop/ui/static/i18n/*.json``); the terms follow the glossary at the top of ``README.zh-CN.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

LANGS = ("en", "zh")

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        # the stage table (`tuneloop demo --quick`, `tuneloop run`, `tuneloop status`)
        "table.title": "{pipeline} — run {run_id}: {overall}",
        "table.stage": "stage",
        "table.status": "status",
        "table.cached": "cached",
        "table.seconds": "seconds",
        "table.info": "key metrics / error",
        "table.yes": "yes",
        "overall.passed": "PASSED",
        "overall.failed": "FAILED",
        "status.passed": "passed",
        "status.failed": "failed",
        "status.skipped": "skipped",
        "status.pending": "pending",
        "status.running": "running",
        # the quick demo
        "demo.start": "[bold]tuneloop demo[/] in {workdir}",
        "demo.base": "  base model {source}: {path}",
        "source.re-used": "re-used",
        "source.shipped": "shipped",
        "source.built": "built",
        "tickets.title": "held-out tickets asked through the gateway",
        "tickets.ticket": "ticket",
        "tickets.expected": "expected",
        "tickets.answer": "served answer",
        "tickets.right": "right",
        "tickets.wrong": "wrong",
        "tickets.score": "  served champion {model} at {url}: {right}/{total} held-out tickets right",
        "served": "served [bold]{model}[/] at {url}: asked {question} -> [bold]{answer}[/]",
        "finished": "demo finished in {seconds} s",
        "report": "report: {path}",
        # the closed loop
        "loop.start": "[bold]tuneloop demo[/]: the closed loop in {workdir}",
        "loop.fresh": "  previous demo's registry, runs and request log removed from {workspace} (stage cache kept)",
        "loop.iteration1": "iteration 1",
        "loop.iteration2.sft": "iteration 2 (original data + feedback)",
        "loop.iteration2.kto": "iteration 2 (KTO on the thumbs, from {ref})",
        "loop.iteration.rule": "[bold]{label}[/]: tuneloop ci {config}",
        "loop.iteration.result": "  {label}: {overall}",
        "loop.iteration.accuracy": ", accuracy {accuracy} on the eval tickets",
        "loop.iteration.trained": ", trained on {sources}",
        "loop.iteration.source": "{path} ({samples} samples)",
        "loop.iteration.version": "; version {version}; report {path}",
        "loop.before": "  iteration 1 ({ref}) on {tickets} held-out new-intent tickets: {right} right",
        "loop.production.rule": "[bold]production[/]: simulated users on the gateway",
        "loop.production": (
            "  {requests} tickets ({new} of them {intent}, an intent iteration 1 never saw); right: original "
            "{original_acc}, new {new_acc}; ratings +1 {up}, -1 {down} with {corrections} corrections"
        ),
        "loop.drift.rule": "[bold]drift[/]: production prompts against the training tickets",
        "loop.drift.top": "  {new_top} of the {top} most drifted production prompts are {intent} tickets, e.g. {example}",
        "loop.export.rule": "[bold]feedback export[/]: rated and corrected answers become data",
        "loop.export": "  {sft} SFT records and {dpo} DPO pairs in {path}, with provenance; SFT records kept out: {dropped}",
        "loop.export.none": "none",
        "loop.canary.rule": "[bold]canary[/]: {version}, decided by the gateway's analysis",
        "loop.canary.start": "  {model} canary {rollout_id} started at 5 %",
        "loop.canary.move": (
            "  {sent:>5} requests sent, {seconds:>5} s: {action} to {weight} after {canary} canary / "
            "{baseline} baseline requests: {reason}"
        ),
        "loop.canary.stuck": "  [red]still running after {seconds} s[/]: {reason}",
        "loop.failed": "[red]demo failed[/]: {problem}",
        "loop.closed.rule": "[bold]the loop, closed[/]",
        "loop.closed.rollout": "  rollout {decision} by the analysis after {canary} canary and {baseline} baseline requests",
        "loop.closed.accuracy": "  new-intent accuracy {new_before} -> {new_after}; original accuracy {orig_before} -> {orig_after}",
        "decision.promoted": "promoted",
        "decision.rolled_back": "rolled back",
        "decision.aborted": "aborted",
        "decision.running": "still running",
        "stats.line": (
            "{name}: canary {c_events}/{c_requests} ({c_rate}), baseline {b_events}/{b_requests} ({b_rate}); "
            "{bound}, margin {margin}; non-inferior: {non_inferior}"
        ),
        "stats.bound": "ratio <= {hi}",
        "stats.unbounded": "ratio unbounded (no events)",
        "bool.true": "True",
        "bool.false": "False",
    },
    "zh": {
        "table.title": "{pipeline} — 运行 {run_id}：{overall}",
        "table.stage": "阶段",
        "table.status": "状态",
        "table.cached": "缓存",
        "table.seconds": "秒",
        "table.info": "关键指标 / 错误",
        "table.yes": "是",
        "overall.passed": "通过",
        "overall.failed": "未通过",
        "status.passed": "通过",
        "status.failed": "失败",
        "status.skipped": "跳过",
        "status.pending": "等待中",
        "status.running": "运行中",
        "demo.start": "[bold]tuneloop 演示[/]，工作目录 {workdir}",
        "demo.base": "  基座模型（{source}）：{path}",
        "source.re-used": "复用已有",
        "source.shipped": "随包提供",
        "source.built": "本地构建",
        "tickets.title": "通过网关提问的留出工单",
        "tickets.ticket": "工单",
        "tickets.expected": "期望答案",
        "tickets.answer": "模型回答",
        "tickets.right": "正确",
        "tickets.wrong": "错误",
        "tickets.score": "  冠军版本 {model} 在 {url} 提供服务：{total} 条留出工单中答对 {right} 条",
        "served": "[bold]{model}[/] 在 {url} 提供服务：提问 {question} → 回答 [bold]{answer}[/]",
        "finished": "演示完成，用时 {seconds} 秒",
        "report": "报告：{path}",
        "loop.start": "[bold]tuneloop 演示[/]：完整闭环，工作目录 {workdir}",
        "loop.fresh": "  已从 {workspace} 删除上一次演示的模型注册表、运行记录和请求日志（保留阶段缓存）",
        "loop.iteration1": "第 1 轮迭代",
        "loop.iteration2.sft": "第 2 轮迭代（原始数据 + 反馈）",
        "loop.iteration2.kto": "第 2 轮迭代（基于 {ref}，用点赞/点踩做 KTO）",
        "loop.iteration.rule": "[bold]{label}[/]：tuneloop ci {config}",
        "loop.iteration.result": "  {label}：{overall}",
        "loop.iteration.accuracy": "，评估工单准确率 {accuracy}",
        "loop.iteration.trained": "，训练数据 {sources}",
        "loop.iteration.source": "{path}（{samples} 个样本）",
        "loop.iteration.version": "；版本 {version}；报告 {path}",
        "loop.before": "  第 1 轮迭代（{ref}）在 {tickets} 条留出的新意图工单上答对 {right} 条",
        "loop.production.rule": "[bold]生产[/]：模拟用户通过网关发送请求",
        "loop.production": (
            "  共 {requests} 条工单（其中 {new} 条属于 {intent}，第 1 轮迭代从未见过的意图）；准确率：原有意图 "
            "{original_acc}，新意图 {new_acc}；评分 +1 共 {up} 条，-1 共 {down} 条，附 {corrections} 条纠正"
        ),
        "loop.drift.rule": "[bold]漂移[/]：生产提示词与训练工单对比",
        "loop.drift.top": "  漂移最明显的 {top} 条生产提示词中有 {new_top} 条是 {intent} 工单，例如 {example}",
        "loop.export.rule": "[bold]反馈导出[/]：带评分和纠正的回答变成数据",
        "loop.export": "  {sft} 条 SFT 记录和 {dpo} 对 DPO 偏好对已写入 {path}，均附来源；被排除的 SFT 记录：{dropped}",
        "loop.export.none": "无",
        "loop.canary.rule": "[bold]金丝雀发布[/]：{version}，由网关的统计分析决定",
        "loop.canary.start": "  {model} 的金丝雀发布 {rollout_id} 已启动，流量 5 %",
        "loop.canary.move": (
            "  已发送 {sent:>5} 个请求，{seconds:>5} 秒：{action}，流量调到 {weight}（依据金丝雀 {canary} 个 / "
            "基线 {baseline} 个请求）：{reason}"
        ),
        "loop.canary.stuck": "  [red]{seconds} 秒后仍在运行[/]：{reason}",
        "loop.failed": "[red]演示失败[/]：{problem}",
        "loop.closed.rule": "[bold]闭环完成[/]",
        "loop.closed.rollout": "  统计分析在金丝雀 {canary} 个、基线 {baseline} 个请求后做出决定：{decision}",
        "loop.closed.accuracy": "  新意图准确率 {new_before} → {new_after}；原有意图准确率 {orig_before} → {orig_after}",
        "decision.promoted": "晋升",
        "decision.rolled_back": "回滚",
        "decision.aborted": "中止",
        "decision.running": "仍在运行",
        "stats.line": (
            "{name}：金丝雀 {c_events}/{c_requests}（{c_rate}），基线 {b_events}/{b_requests}（{b_rate}）；"
            "{bound}，容限 {margin}；非劣效：{non_inferior}"
        ),
        "stats.bound": "比值 ≤ {hi}",
        "stats.unbounded": "比值无上界（无事件）",
        "bool.true": "是",
        "bool.false": "否",
    },
}


def resolve_lang(lang: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``"en"`` or ``"zh"``. ``lang`` (``--lang``) wins: ``en``, ``zh``, ``zh-CN``, ``zh_CN``... (case aside);
    without it the locale decides as POSIX does (the first set of ``LC_ALL``, ``LC_MESSAGES``, ``LANG``):
    ``zh*`` -> Chinese, anything else English. Raises ValueError for a ``lang`` that is neither."""
    if lang is not None:
        code = lang.strip().lower().replace("_", "-")
        if code == "en" or code.startswith("en-"):
            return "en"
        if code == "zh" or code.startswith("zh-"):
            return "zh"
        raise ValueError(f"--lang {lang!r}: use en (English) or zh (Simplified Chinese)")
    env = os.environ if env is None else env
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(var)
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def msg(lang: str, key: str, **values) -> str:
    """The message ``key`` in ``lang`` (``"en"`` / ``"zh"``) with its placeholders filled; English when the
    language lacks it. Values are inserted as given: numbers are formatted by the caller, identically in both."""
    table = MESSAGES.get(lang, MESSAGES["en"])
    return (table.get(key) or MESSAGES["en"][key]).format(**values)


def word(lang: str, group: str, value: str) -> str:
    """A value of a small closed set (a status, a decision, a source) in ``lang``; the value itself when the table
    has no entry for it (an unknown status is shown as it is, never hidden)."""
    key = f"{group}.{value}"
    return msg(lang, key) if key in MESSAGES["en"] else value
