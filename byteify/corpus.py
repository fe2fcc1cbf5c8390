"""The embedded default corpus: real English text that every CPython installation carries
(the language reference topics in the standard library's ``pydoc_data``), so demos and tests
never download data.  Also the fixed probe text used for bytes-per-token measurements."""

from __future__ import annotations

PROBE_TOPICS = ("if", "for", "while", "try", "with")


def default_documents() -> list[tuple[str, str]]:
    """(name, text) for every pydoc topic, in a stable order."""
    from pydoc_data.topics import topics

    return [(f"pydoc_data:{name}", topics[name]) for name in sorted(topics)]


def probe_text(max_chars: int = 8000) -> str:
    """A fixed slice of the corpus (the compound-statement topics) for quick measurements."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[t] for t in PROBE_TOPICS)[:max_chars]
