"""README.zh-CN.md keeps in step with README.md: the set-up commands (the two commands, the quickstart's commands)
are there verbatim, the two READMEs link to each other at the top, the Chinese one's links lead somewhere, and
each screenshot the English README shows has its Chinese counterpart in the Chinese README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The command of each line, without its trailing `# comment` (a comment is translated, the command is not)."""
    out = []
    for line in block.splitlines():
        command = re.split(r"\s{2,}#\s", line, maxsplit=1)[0].rstrip()
        if command and not command.lstrip().startswith("#"):
            out.append(command)
    return out


def zh_command_lines() -> set[str]:
    return {c for block in bash_blocks(read("README.zh-CN.md")) for c in commands(block)}


def test_the_two_commands_are_in_the_chinese_readme_verbatim():
    two = bash_blocks(section(read("README.md"), "Two commands"))
    assert len(two) == 2, "README.md's 'Two commands' section has the set-up command and the test command"
    zh_blocks = bash_blocks(read("README.zh-CN.md"))
    for block in two:
        assert block in zh_blocks, f"README.zh-CN.md lacks this command block exactly as README.md has it:\n{block}"


@pytest.mark.parametrize("heading", ["Quickstart", "Web UI"])
def test_the_quickstart_and_web_ui_commands_are_in_the_chinese_readme(heading):
    wanted = [c for block in bash_blocks(section(read("README.md"), heading)) for c in commands(block)]
    assert wanted, f"README.md's {heading} has no bash block"
    missing = [c for c in wanted if c not in zh_command_lines()]
    assert not missing, (
        f"commands of README.md's {heading} that README.zh-CN.md lacks (copy them; translate the comments "
        "only):\n" + "\n".join(missing)
    )


def test_each_readme_links_the_other_at_the_top():
    assert "[简体中文](README.zh-CN.md)" in "\n".join(read("README.md").splitlines()[:5])
    assert "[English](README.md)" in "\n".join(read("README.zh-CN.md").splitlines()[:5])


def test_the_chinese_readme_links_lead_somewhere():
    zh = read("README.zh-CN.md")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", zh)
    assert targets
    broken = [t for t in targets if not t.startswith(("http://", "https://")) and not (ROOT / t).exists()]
    assert not broken, f"README.zh-CN.md links to files that do not exist: {broken}"


def test_every_screenshot_of_the_readme_has_its_chinese_counterpart():
    """README.md shows docs/images/X.png; README.zh-CN.md shows docs/images/X.zh-CN.png (the UI in Chinese)."""
    en_images = re.findall(r"!\[[^\]]*\]\((docs/images/[^)]+\.png)\)", read("README.md"))
    zh_images = re.findall(r"!\[[^\]]*\]\((docs/images/[^)]+\.png)\)", read("README.zh-CN.md"))
    expected = [p[: -len(".png")] + ".zh-CN.png" for p in en_images if not p.endswith(".zh-CN.png")]
    assert sorted(expected) == sorted(zh_images), (en_images, zh_images)
    for path in en_images + zh_images:
        assert (ROOT / path).is_file(), f"{path} is shown in a README but is not in the repository"
