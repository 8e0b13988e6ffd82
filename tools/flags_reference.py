"""The README's flags reference, generated from the absl flags of `aepo_jax/train/flags.py`.

  python tools/flags_reference.py            print the Markdown block
  python tools/flags_reference.py --write    rewrite README.md between the flags-reference markers
  python tools/flags_reference.py --check    exit 1 if README.md's block differs from the flags

Only the flags that module defines are listed (not absl's built-ins such as --flagfile), in definition
order, grouped by the `# --- group ---` comment lines of the module. `tests/test_flags_reference.py` runs
the check, so a flag added or changed without `--write` fails the tests.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import pathlib
import re
import sys

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- flags-reference:begin -->"
END = "<!-- flags-reference:end -->"
WRITE_COMMAND = "python tools/flags_reference.py --write"

_GROUP = re.compile(r"^#\s*-{3,}\s*(.*?)\s*-*\s*$")
_ENUM_PREFIX = re.compile(r"^<[^>]*>:\s*")


class MarkerError(ValueError):
    """README.md lacks the begin / end markers (or has them out of order, or more than once)."""


def _groups(source: str, names: list[str]) -> dict[str, str]:
    """{flag name: group} from the `# --- group ---` line above each flag's definition in `source`."""
    group, found = "", {}
    wanted = set(names)
    for line in source.splitlines():
        header = _GROUP.match(line.strip())
        if header:
            group = header.group(1)
            continue
        for name in re.findall(r"""DEFINE_\w+\(\s*["'](\w+)["']""", line):
            if name in wanted and name not in found:
                found[name] = group
    return found


def _escape(text: str) -> str:
    """Help text as a Markdown table cell: no raw pipes, angle brackets or emphasis markers."""
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("*", "\\*"))


def _default(flag) -> str:
    value = flag.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str) and not value:
        return '`""`'
    if isinstance(value, (list, tuple)):
        return "`" + ",".join(map(str, value)) + "`"
    return f"`{value}`"


def _help(flag) -> str:
    text = flag.help or ""
    choices = getattr(flag.parser, "enum_values", None)
    if choices:
        text = _ENUM_PREFIX.sub("", text)
    text = _escape(text.strip())
    if not text or text == "(no help available)":
        raise ValueError(f"--{flag.name} has no help text: give it one in its DEFINE call")
    if choices:
        text += " (one of " + ", ".join(f"`{c}`" for c in choices) + ")"
    return text


def render(flag_values: flags.FlagValues = flags.FLAGS, module_name: str = "aepo_jax.train.flags",
           source: str | None = None) -> str:
    """The Markdown block (without the markers) for the flags `module_name` defines in `flag_values`.

    `source` is the module's text (for the group headers); by default it is read from the module's file.
    """
    if flag_values is flags.FLAGS and module_name not in sys.modules:
        importlib.import_module(module_name)  # importing the module defines its flags
    defined = flag_values.get_flags_for_module(module_name)
    if not defined:
        raise ValueError(f"no flags are defined by module {module_name!r}")
    if source is None:
        source = pathlib.Path(sys.modules[module_name].__file__).read_text(encoding="utf-8")
    group_of = _groups(source, [f.name for f in defined])
    lines: list[str] = []
    current = None
    for flag in defined:
        group = group_of.get(flag.name, "other")
        if group != current:
            if lines:
                lines.append("")
            lines += [f"**{group}**" if group else "**flags**", "",
                      "| flag | default | help |", "| --- | --- | --- |"]
            current = group
        lines.append(f"| `--{flag.name}` | {_default(flag)} | {_help(flag)} |")
    return "\n".join(lines) + "\n"


def current_block(text: str) -> tuple[int, int]:
    """(start, end) offsets of the text between the markers in `text`."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise MarkerError(f"README.md must contain {BEGIN} and {END} exactly once each")
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END)
    if end < start:
        raise MarkerError(f"{END} comes before {BEGIN} in README.md")
    return start, end


def _between_markers(block: str) -> str:
    """What goes between the markers: the block, a blank line on either side."""
    return "\n\n" + block + "\n"


def with_block(text: str, block: str) -> str:
    """`text` with the block between the markers replaced by `block`."""
    start, end = current_block(text)
    return text[:start] + _between_markers(block) + text[end:]


def stale_diff(text: str, block: str) -> str:
    """A unified diff from the README's block to `block` ('' when they are equal)."""
    start, end = current_block(text)
    old = text[start:end]
    new = _between_markers(block)
    if old == new:
        return ""
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "README.md (flags block)",
                                        "generated from aepo_jax/train/flags.py"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the block in the README")
    action.add_argument("--check", action="store_true", help="exit 1 if the README's block is stale")
    parser.add_argument("--readme", type=pathlib.Path, default=README, help="the README to read / rewrite")
    args = parser.parse_args(argv)

    block = render()
    if not (args.write or args.check):
        sys.stdout.write(block)
        return 0
    text = args.readme.read_text(encoding="utf-8")
    try:
        diff = stale_diff(text, block)
    except MarkerError as e:
        print(f"{args.readme}: {e}", file=sys.stderr)
        return 2
    if args.check:
        if diff:
            sys.stderr.write(diff)
            print(f"{args.readme}: the flags reference is stale (it differs from aepo_jax/train/flags.py); "
                  f"run `{WRITE_COMMAND}`", file=sys.stderr)
            return 1
        print(f"{args.readme}: the flags reference is up to date")
        return 0
    if diff:
        args.readme.write_text(with_block(text, block), encoding="utf-8")
        print(f"{args.readme}: flags reference rewritten")
    else:
        print(f"{args.readme}: the flags reference is already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
