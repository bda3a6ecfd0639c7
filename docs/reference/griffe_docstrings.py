"""A Griffe extension for the API reference: makes tokred's docstrings render well as Markdown.

tokred's docstrings are Google style, with Sphinx-style roles such as ``:class:`Selector``` or
``:func:`~tokred.apply``` for cross-references. mkdocstrings renders Markdown, where those roles would
show up verbatim. This extension rewrites each role into an optional autorefs reference: the name is
resolved in the scope of the documented object (as Python would resolve it there), linked when the
target is part of the reference, and shown as plain code when it is not (e.g. ``torch.Tensor``).
A ``~`` prefix shows only the last component, as in Sphinx. A reStructuredText literal-block marker
(a paragraph ending in ``::``) becomes a single colon; the indented block after it is already a code
block in Markdown. An ``Args:`` entry that documents several parameters at once
(``height, width: the grid``, a NumPy-style habit) becomes one entry per parameter, as the Google
style that Griffe parses requires. A pydantic field without a docstring, ``name: T = Field(default,
description="...")``, is shown as ``name: T = default`` with its description as its docstring, so
that every option of a method or component is listed with its default and meaning. An attribute
documented Sphinx-style by ``#:`` comment lines right above it gets those lines as its docstring.

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import ast
import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|attr|mod|data|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`]+)`")
_LITERAL_MARKER = re.compile(r"(?<=\S)::$", flags=re.MULTILINE)
_CALLABLE_ROLES = {"func", "meth"}
_ARGS_HEADER = re.compile(r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters|Params):[ \t]*$")
_SHARED_ENTRY = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\w+(?:[ \t]*,[ \t]*\w+)+):(?P<rest>[ \t].*)$")


def _split_shared_entries(text: str) -> str:
    """One ``name: description`` entry per parameter in ``Args:`` sections."""
    lines, out, in_args, header_indent = text.splitlines(), [], False, 0
    for line in lines:
        header = _ARGS_HEADER.match(line)
        if header:
            in_args, header_indent = True, len(header["indent"])
        elif in_args and line.strip() and len(line) - len(line.lstrip()) <= header_indent:
            in_args = False  # the next section or paragraph
        shared = _SHARED_ENTRY.match(line) if in_args else None
        if shared:
            out.extend(f"{shared['indent']}{name.strip()}:{shared['rest']}" for name in shared["names"].split(","))
        else:
            out.append(line)
    return "\n".join(out)


def _resolve(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj``: its first component is looked up in the
    scope of ``obj`` and its parents; the rest is appended. Unknown names are returned unchanged."""
    first, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            resolved = scope.resolve(first)
        except (griffe.NameResolutionError, KeyError, AttributeError):
            scope = scope.parent
            continue
        return f"{resolved}.{rest}" if rest else resolved
    return target


def rewrite(text: str, obj: griffe.Object) -> str:
    """``text`` with every Sphinx role replaced by an optional autorefs reference."""

    def replace(match: re.Match[str]) -> str:
        target = match["target"].strip()
        identifier = _resolve(obj, target)
        title = target.rsplit(".", 1)[-1] if match["tilde"] else target
        if match["role"] in _CALLABLE_ROLES:
            title += "()"
        return (
            f'<autoref identifier="{html.escape(identifier)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>"
        )

    return _split_shared_entries(_LITERAL_MARKER.sub(":", _ROLE.sub(replace, text)))


def _literal(expr: object) -> object:
    """The Python value of a literal expression, or its source text when it is not a literal."""
    try:
        return ast.literal_eval(str(expr))
    except (ValueError, SyntaxError):
        return str(expr)


def comment_docstring(attribute: griffe.Attribute) -> str | None:
    """The text of the ``#:`` comment lines directly above ``attribute``'s assignment, if any."""
    if attribute.filepath is None or attribute.lineno is None or isinstance(attribute.filepath, list):
        return None
    try:
        source = attribute.lines_collection[attribute.filepath]
    except KeyError:
        return None
    comment: list[str] = []
    index = attribute.lineno - 2  # the line above the assignment, 0-based
    while index >= 0 and source[index].strip().startswith("#:"):
        comment.insert(0, source[index].strip()[2:].strip())
        index -= 1
    return "\n".join(comment) or None


def _escape_outside_code(text: str) -> str:
    """``<`` and ``>`` escaped except inside backtick code spans (``'index:<i>'`` is not a tag)."""
    parts = text.split("`")
    return "`".join(html.escape(part, quote=False) if i % 2 == 0 else part for i, part in enumerate(parts))


def document_field(attribute: griffe.Attribute) -> bool:
    """For a pydantic ``Field(...)`` attribute with a ``description``: make the description its
    docstring and its default its value (``tau: float = 0.1``). Returns whether it did."""
    value = attribute.value
    if not isinstance(value, griffe.ExprCall) or str(value.function).rsplit(".", 1)[-1] != "Field":
        return False
    keywords = {arg.name: arg.value for arg in value.arguments if isinstance(arg, griffe.ExprKeyword)}
    positional = [arg for arg in value.arguments if not isinstance(arg, griffe.ExprKeyword)]
    if "description" not in keywords:
        return False
    parent = attribute.parent
    parser = parent.docstring.parser if parent is not None and parent.docstring is not None else None
    attribute.docstring = griffe.Docstring(
        _escape_outside_code(str(_literal(keywords["description"]))), parent=attribute, parser=parser
    )
    if positional and str(positional[0]) not in ("...", "Ellipsis"):
        attribute.value = positional[0]
    elif "default" in keywords:
        attribute.value = keywords["default"]
    elif "default_factory" in keywords:
        attribute.value = f"{keywords['default_factory']}()"
    else:
        attribute.value = None  # a required field
    return True


class ReferenceDocstrings(griffe.Extension):
    """Rewrites the docstrings of every loaded object once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_attribute and obj.docstring is None:
            if document_field(obj):  # type: ignore[arg-type]
                return
            text = comment_docstring(obj)  # type: ignore[arg-type]
            if text is not None:
                obj.docstring = griffe.Docstring(text, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, obj)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        # The top-level package itself is not among the objects ``on_object`` sees.
        self.on_object(obj=pkg)
