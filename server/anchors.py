"""The anchor set: public, unlabelled texts the server hands out so that devices of every
architecture upload the activations of the *same* texts (split ``anchor``, sample id = the
text's position in the set). Paired across architectures, they train the alignments to map
one text to one place (``SideConfig.anchor_*``): what one architecture's devices learn then
reaches the others.

A device's share is a slice of ``per_device`` texts chosen by its rank among the devices of
its architecture (order of registration): the first device of an architecture takes texts
0..per_device-1, the second the next slice, and so on, so an architecture covers the set
once however many devices it has.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fedmobillm.errors import FedMobiLLMError

MAX_ANCHOR_CHARS = 2000


@dataclass(frozen=True)
class AnchorSet:
    texts: tuple[str, ...]
    digest: str  # sha256 of the texts (JSON list), names the set on the wire
    per_device: int

    def share(self, rank: int) -> list[int]:
        """Anchor ids (positions) for the device of this rank within its architecture."""
        start = rank * self.per_device
        return list(range(start, min(len(self.texts), start + self.per_device)))


def load_anchor_set(path: Path, per_device: int) -> AnchorSet:
    """Texts from ``path``: a ``.jsonl`` file of ``{"text": ...}`` objects, or any other
    file with one text per line. Empty lines are skipped; every text must be unique."""
    path = Path(path)
    if not path.is_file():
        raise FedMobiLLMError(
            f"anchor file {path} does not exist",
            hint='pass a text file (one text per line) or a .jsonl file of {"text": ...}',
        )
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FedMobiLLMError(f"{path}:{n}: not a JSON object: {exc}") from exc
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise FedMobiLLMError(f'{path}:{n}: needs a string field "text"')
                line = obj["text"].strip()
            if len(line) > MAX_ANCHOR_CHARS:
                raise FedMobiLLMError(
                    f"{path}:{n}: text of {len(line)} characters, at most {MAX_ANCHOR_CHARS}"
                )
            texts.append(line)
    if len(texts) < 2:
        raise FedMobiLLMError(f"anchor file {path} holds {len(texts)} texts; at least 2 needed")
    if len(set(texts)) != len(texts):
        raise FedMobiLLMError(f"anchor file {path} repeats texts: each anchor must be unique")
    if per_device < 1:
        raise FedMobiLLMError("anchors_per_device must be at least 1")
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    return AnchorSet(tuple(texts), digest, per_device)
