"""Model licences: before the panel first uses (and so downloads) a model whose licence is not
permissive, the user sees the licence and its link and accepts or declines; the answer is kept per
model. Read from the torch-free model catalogue (medsam2.models.catalogue).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import MutableMapping, Optional

PERMISSIVE = frozenset({"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause"})
ACCEPTED = "accepted"


@dataclass(frozen=True)
class LicenceQuestion:
    model: str
    licence: str  # e.g. "CC-BY-SA-4.0 (the model card also says: for research and education only)"
    link: str  # where the licence and model card are published

    def text(self) -> str:
        return (
            f"The weights of {self.model} are published under {self.licence}.\n"
            f"Read the licence and model card at {self.link} before using them.\n"
            "Do you accept these terms for this model?"
        )


def licenceQuestion(model: str) -> Optional[LicenceQuestion]:
    """The question to ask before ``model`` is used, or None (permissive, a local file, a test model)."""
    try:
        from medsam2.models.catalogue import get_model
    except ImportError:  # engine not installed: nothing can be downloaded yet
        return None
    try:
        entry = get_model(model)
    except Exception:  # not a catalogue name: a local checkpoint file or a test model, no download
        return None
    if entry.is_local or entry.licence.strip().lower() in PERMISSIVE:
        return None
    link = f"https://huggingface.co/{entry.repo_id}" if entry.repo_id else entry.source
    return LicenceQuestion(entry.name, entry.licence_text, link)


class LicenceRecord:
    """Answers per model, in any string mapping (QSettings in Slicer, a dict in tests)."""

    def __init__(self, store: MutableMapping[str, str]) -> None:
        self.store = store

    def key(self, model: str) -> str:
        return f"licence/{model}"

    def accepted(self, model: str) -> bool:
        question = licenceQuestion(model)
        return question is None or self.store.get(self.key(question.model)) == ACCEPTED

    def accept(self, model: str) -> None:
        question = licenceQuestion(model)
        if question is not None:
            self.store[self.key(question.model)] = ACCEPTED

    def decline(self, model: str) -> None:
        question = licenceQuestion(model)
        if question is not None:
            self.store.pop(self.key(question.model), None)
