"""The spec reference in Markdown, generated from the pydantic models (README embeds it)."""

from __future__ import annotations

import typing

from pydantic import BaseModel


def _rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _rows(ann, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        if typing.get_origin(ann) is typing.Literal:
            kind = " / ".join(repr(a) for a in typing.get_args(ann))
        else:
            kind = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        yield f"{prefix}{name}", kind, default, field.description or ""


def markdown_reference(spec_cls: type[BaseModel]) -> str:
    lines = ["| field | type | default | what it does |", "| --- | --- | --- | --- |"]
    for key, kind, default, doc in _rows(spec_cls):
        if key == "stage":
            continue
        kind = kind.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | `{default!r}` | {doc} |")
    return "\n".join(lines)


def render_readme(text: str) -> str:
    """``text`` with every ``<!-- spec-reference:STAGE -->`` block regenerated."""
    import re

    from raystages.spec import spec_class

    def fill(m: re.Match) -> str:
        stage = m.group(1)
        return f"<!-- spec-reference:{stage} -->\n{markdown_reference(spec_class(stage))}\n<!-- /spec-reference:{stage} -->"

    return re.sub(r"<!-- spec-reference:(\w+) -->.*?<!-- /spec-reference:\1 -->", fill, text, flags=re.S)


if __name__ == "__main__":
    # python -m raystages.specdoc README.md: refresh the reference tables in place.
    import sys
    from pathlib import Path

    for name in sys.argv[1:]:
        p = Path(name)
        p.write_text(render_readme(p.read_text()))
