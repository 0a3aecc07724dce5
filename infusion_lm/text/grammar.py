"""A grammar check that shares none of the language model's biases: the Link Grammar parser (CMU; Debian's
``python3-link-grammar``). A sentence that parsed with no null links before an edit and needs some after it is a
change a reader would notice. The parser forgives a lot (unknown words are guessed, so "Thefish" parses, and noun
compounds such as "a fish acorn" are grammatical), so it sits beside ONION, not instead of it.

Optional: where the parser is not installed every report says so and how to install it, and nothing else changes.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# where Debian's package puts the bindings; a virtual environment does not see the system's site-packages
DEBIAN_BINDINGS = Path("/usr/lib/python3/dist-packages/linkgrammar/__init__.py")
INSTALL_HINT = "link-grammar is not installed: apt-get install python3-link-grammar (Debian/Ubuntu)"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


@lru_cache(maxsize=1)
def load_link_grammar():
    """The ``linkgrammar`` module, from this environment or from Debian's system package; None where neither loads."""
    try:
        import linkgrammar

        return linkgrammar
    except ImportError:
        pass
    if not DEBIAN_BINDINGS.is_file():
        return None
    try:  # only this one package, so nothing else of the system's site-packages shadows the environment's
        spec = importlib.util.spec_from_file_location("linkgrammar", DEBIAN_BINDINGS,
                                                      submodule_search_locations=[str(DEBIAN_BINDINGS.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["linkgrammar"] = module
        spec.loader.exec_module(module)
        return module
    except (ImportError, OSError):  # built for another Python
        sys.modules.pop("linkgrammar", None)
        return None


def sentences(text: str) -> List[str]:
    """The text split after ., ! or ? (and any closing quote or bracket) followed by whitespace."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


class GrammarCheck:
    """Null links per sentence under the English dictionary; raises ImportError with the install line if absent."""

    def __init__(self):
        lg = load_link_grammar()
        if lg is None:
            raise ImportError(INSTALL_HINT)
        self.lg = lg
        self.dictionary = lg.Dictionary("en")
        self.options = lg.ParseOptions(min_null_count=0, max_null_count=250, verbosity=0)
        self.version = getattr(lg, "__version__", "unknown")

    @lru_cache(maxsize=100_000)
    def null_count(self, sentence: str) -> int:
        s = self.lg.Sentence(sentence, self.dictionary, self.options)
        s.parse()
        return int(s.null_count())

    def made_unparseable(self, before: str, after: str) -> int:
        """Sentences of ``after`` that need null links where ``before``'s did not. Sentences are paired in order when
        the edit kept their number; otherwise the count of unparseable sentences that the edit added."""
        b, a = sentences(before), sentences(after)
        if len(b) == len(a):
            return sum(self.null_count(x) == 0 and self.null_count(y) > 0 for x, y in zip(b, a))
        return max(0, sum(self.null_count(y) > 0 for y in a) - sum(self.null_count(x) > 0 for x in b))


def grammar_report(records: Sequence[Dict], check: Optional[GrammarCheck]) -> Dict:
    """Per arm: how many edited documents have a sentence the edit made unparseable, and how many sentences."""
    if check is None:
        return {"skipped": INSTALL_HINT}
    broken = [check.made_unparseable(r["original_text"], r["text"]) for r in records]
    return {"parser": f"link-grammar {check.version}", "documents": len(broken),
            "sentences_made_unparseable": int(sum(broken)),
            "documents_with_a_sentence_made_unparseable": sum(b > 0 for b in broken) / len(broken) if broken else None}
