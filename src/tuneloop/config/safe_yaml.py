"""YAML read with limits: a config file cannot hang, exhaust memory or overflow the stack while it is read.

Entry point: :func:`safe_load_yaml` (``yaml.safe_load`` that refuses alias/merge-key bombs and deep nesting,
every problem a ConfigError with file:line). :func:`short_repr` keeps a bad value short in any message.
"""

from __future__ import annotations

from typing import Any

import yaml

from tuneloop.errors import ConfigError, short_repr

MAX_YAML_NODES = 100_000  # scalars + collections after aliases and merge keys are expanded
MAX_YAML_DEPTH = 64


def safe_load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with limits: alias/merge expansion, nesting depth; every problem is a ConfigError.

    The document is composed to a node graph first (aliases are shared nodes there, so composing is linear in
    the text), its expanded size and depth are measured on that graph, and only then is it constructed. An
    alias or merge-key "bomb" of a few hundred bytes is refused in milliseconds instead of hanging or
    exhausting memory; nesting that would overflow Python's stack is refused the same way.
    """
    loader = yaml.SafeLoader(text)
    try:
        _check_nesting(text, source)  # before composing, which recurses once per level
        node = loader.get_single_node()
        if node is None:
            return None
        problem = _yaml_size_problem(node)
        if problem:
            raise ConfigError(f"{source}: {problem}", source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = short_repr(getattr(exc, "problem", None) or str(exc))
        raise ConfigError(f"{where}: malformed YAML: {problem}; fix the syntax at that line", source) from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4,300 digits
        raise ConfigError(f"{source}: a value could not be read: {short_repr(str(exc))}", source) from None
    except RecursionError:
        raise ConfigError(
            f"{source}: YAML nested too deeply (limit {MAX_YAML_DEPTH} levels); flatten the config", source
        ) from None
    finally:
        loader.dispose()


def _flow_depth(text: str) -> int:
    """The deepest nesting of flow brackets (``[``/``{``) outside quotes and comments, in one linear pass.

    PyYAML's scanner is quadratic in flow nesting (it re-checks every open level's possible key per token), so
    a deep ``[[[[...]]]]`` is refused on this count before the scanner sees it.
    """
    depth = deepest = 0
    quote, prev = "", "\n"
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"" and prev in " \t\n[{,:":
            quote = ch
        elif ch == "#" and prev in " \t\n":
            j = text.find("\n", i)
            i = n if j < 0 else j
            prev = "\n"
            continue
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
        prev = ch
        i += 1
    return deepest


def _check_nesting(text: str, source: str) -> None:
    """Refuse nesting deeper than MAX_YAML_DEPTH before composing (which recurses once per level): flow
    brackets counted on the text, then block nesting from the parser's events, stopping at the first."""
    if _flow_depth(text) > MAX_YAML_DEPTH:
        raise ConfigError(
            f"{source}: YAML nested deeper than {MAX_YAML_DEPTH} levels ([ and {{ brackets); flatten the config", source
        )
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                line = event.start_mark.line + 1
                raise ConfigError(
                    f"{source}:{line}: YAML nested deeper than {MAX_YAML_DEPTH} levels; flatten the config", source
                )
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _yaml_size_problem(root: yaml.Node) -> str | None:
    """Why a composed YAML graph is too big or too deep once expanded (None when it is fine)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def expanded(node: yaml.Node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise _YamlLimit(
                f"YAML nested deeper than {MAX_YAML_DEPTH} levels (line {node.start_mark.line + 1}); flatten the config"
            )
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _YamlLimit(
                f"recursive YAML alias at line {node.start_mark.line + 1}; a config cannot refer to itself"
            )
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        total = 1
        for child in children:
            total += expanded(child, depth + 1)
            if total > MAX_YAML_NODES:
                raise _YamlLimit(
                    f"YAML expands to more than {MAX_YAML_NODES:,} values (aliases and merge keys counted at each "
                    f"use, near line {node.start_mark.line + 1}); a config this large is refused"
                )
        active.discard(key)
        sizes[key] = total
        return total

    try:
        expanded(root, 0)
    except _YamlLimit as exc:
        return str(exc)
    return None


class _YamlLimit(Exception):
    pass
