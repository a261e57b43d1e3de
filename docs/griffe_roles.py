"""A griffe extension for the API reference (mkdocs.yml): Sphinx roles in docstrings
become mkdocstrings cross-references, and "Example:" sections griffe's examples.

The docstrings write ``:class:`BCSR```, ``:func:`~jsparse.nn.sparsify```,
``:meth:`validate``` ... A role whose target griffe finds (a dotted path from a loaded
package, or a name in the scope of the documented object) becomes an optional
autorefs link: a link when the target is rendered on some page, plain code when it is
not. Any other target (``flax.nnx.Param``, ``ValueError``) becomes plain code. So no
role can break ``mkdocs build --strict``; ``unresolved()`` lists the targets that
griffe could not find, to fix in the docstrings.
"""

from __future__ import annotations

import builtins
import html
import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
# The docstrings title their doctests "Example:"; griffe reads "Examples:" as the
# section whose ``>>>`` lines become highlighted code (not Markdown).
EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.MULTILINE)

# Roles whose target griffe could not find: (object path, target).
_UNRESOLVED: list[tuple[str, str]] = []


def unresolved() -> list[tuple[str, str]]:
    """The ``(object, target)`` pairs of the roles last left as plain code."""
    return list(_UNRESOLVED)


SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Keyword Args|Other Parameters|Attributes|Raises|Warns):\s*$"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def tidy_sections(text: str) -> str:
    """Two layouts griffe's Google parser misreads, made regular: an entry whose names
    run over several lines (``a, b, c,`` then ``d: ...`` indented below: joined into
    one line), and a description continued at the entries' own indent (indented)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        if not SECTION.match(lines[i]):
            i += 1
            continue
        header = _indent(lines[i])
        i += 1
        item = None
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                out.append(line)
                i += 1
                continue
            if _indent(line) <= header:
                break
            if item is None:
                item = _indent(line)
            if _indent(line) == item:
                # names continued on the next line(s): "a, b," / "    c: description"
                while (
                    line.rstrip().endswith(",")
                    and ":" not in line
                    and i + 1 < len(lines)
                    and _indent(lines[i + 1]) > item
                ):
                    i += 1
                    line = line.rstrip() + " " + lines[i].strip()
                if not re.match(r"^\s*[^:]+:(\s|$)", line):
                    line = " " * 2 + line  # a description continued at the entry's indent
            out.append(line)
            i += 1
    return "\n".join(out)


def _lookup(collection, path: str):
    """The object at the dotted ``path`` (through aliases and inherited members)."""
    head, *rest = path.split(".")
    try:
        obj = collection[head]
        for name in rest:
            if obj.is_alias:
                obj = obj.final_target
            members = obj.all_members if obj.is_class else obj.members
            obj = members[name]
    except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError,
            griffe.CyclicAliasError):
        return None
    return obj


def resolve(obj: griffe.Object, target: str, collection) -> str | None:
    """The full path of ``target`` as seen from ``obj``, or ``None``."""
    target = target.strip().rstrip("()")
    if _lookup(collection, target) is not None:
        return target
    head, _, rest = target.partition(".")
    scope = obj
    while scope is not None:
        if scope.is_class and head in scope.all_members:  # inherited members too
            member = scope.all_members[head]
            base = member.target_path if member.is_alias else member.path
            path = f"{base}.{rest}" if rest else base
            if _lookup(collection, path) is not None:
                return path
        try:
            base = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError, KeyError, ValueError):
            base = None
        if base is not None:
            path = f"{base}.{rest}" if rest else base
            if _lookup(collection, path) is not None:
                return path
        scope = scope.parent
    return None


def convert(text: str, obj: griffe.Object, collection) -> str:
    """``text`` with every role replaced by a link or by plain code."""

    def repl(match: re.Match) -> str:
        short, target = match.group(1), match.group(2)
        title = target.rsplit(".", 1)[-1] if short else target
        path = resolve(obj, target, collection)
        if path is None:
            if target.split(".")[0] in ("jsparse", "pallas_kernels") or (
                "." not in target and not hasattr(builtins, target)
            ):
                _UNRESOLVED.append((obj.path, target))
            return f"`{title}`"
        code = f"<code>{html.escape(title)}</code>"
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return EXAMPLE.sub(r"\1Examples:", ROLE.sub(repl, text))


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        collection = loader.modules_collection
        seen: set[int] = set()

        def walk(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                text = tidy_sections(obj.docstring.value)
                obj.docstring.value = convert(text, obj, collection)
            for member in obj.members.values():
                if not member.is_alias:
                    walk(member)

        walk(pkg)

    # griffe 1 named the hook on_package_loaded.
    on_package_loaded = on_package
