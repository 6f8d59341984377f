"""What a model produced, as every role sees it: the worker fills these, ``reporting.versions`` writes them
into the registry and the SR. Plain data (no torch), so reporting and the tests need no model code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Provenance:
    """What produced a report: written into the SR (algorithm identification) and the registry."""

    name: str  # e.g. "RaDialog-LLaVA"
    version: str  # e.g. "2.0"
    files_sha256: str  # hash over the loaded model files (names + contents)
    device: str = "cpu"
    dtype: str = "float32"
    tiny: bool = False  # True for a random-initialised test checkpoint: never a clinical model
    display_name: str = ""  # the short name readers know it by ("RaDialog", "XrayGPT"): SR series description

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassifierFinding:
    """One CheXpert label from the findings classifier."""

    label: str
    probability: float
    present: bool


@dataclass
class ReportOutput:
    key: str
    findings_text: str
    findings: list[ClassifierFinding]
    findings_phrase: str  # the "Predicted Findings: ..." text given to the LLM
    generated_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
