"""The exact prompt strings RaDialog v2 was instruction-tuned on (torch-free: the API imports this).

Strings follow the published v2 code (demo, evaluation script, downstream-task prompts). A changed comma
changes what the model generates, so tests compare these byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: Vicuna v1.1 system text with RaDialog's radiologist persona.
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant acting as an experienced "
    "radiologist. The assistant gives professional, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP = " "  # after the system text and after each user turn
SEP2 = "</s>"  # after each assistant answer
IMAGE_PLACEHOLDER = "<image>"

#: CheXpert label order of the findings classifier's outputs.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NO_COMMON_FINDINGS = "no common findings"

LIST_FINDINGS = "List all the findings in this report."
IMPRESSION = "Write the impression section corresponding to this radiology report."
EASY_LANGUAGE = "Reformulate the radiology report in easy language for a patient to understand."
SUMMARY = "Summarize this radiology report in one or two sentences."
#: Asked as the FIRST turn instead of the report prompt, hence it carries the image.
VIEW_PROMPT = "<image> From what view was this image taken?"

#: Per-task generation limits (v1's evaluation limits; v2's demo allows 600 for free questions).
TASK_MAX_NEW_TOKENS: dict[str, int] = {
    "report": 300,
    "correction": 300,
    "yes_no": 10,
    "list": 60,
    "impression": 150,
    "easy_language": 300,
    "summary": 150,
    "view": 10,
    "free": 600,
}
#: The reference demo refuses conversations longer than this (prompt + generated tokens).
MAX_CONTEXT_TOKENS = 4000


def findings_phrase(labels: Iterable[str]) -> str:
    """The "Predicted Findings" text from the classifier's positive labels (CheXpert order kept).

    As in the reference evaluation: "No Finding" is dropped when a finding other than "Support Devices"
    is present; nothing positive gives "no common findings".
    """
    present = [label for label in labels]
    if not present:
        return NO_COMMON_FINDINGS
    ignorable = {"No Finding", "Support Devices"}
    if "No Finding" in present and any(label not in ignorable for label in present):
        present.remove("No Finding")
    return ", ".join(present).lower().strip()


def report_prompt(findings: str) -> str:
    """The v2 report instruction (first turn; holds the image placeholder)."""
    return (
        f"<image>. Predicted Findings: {findings}. You are to act as a radiologist and write the finding "
        "section of a chest x-ray radiology report for this X-ray image and the given predicted findings. "
        "Write in the style of a radiologist, write one fluent text without enumeration, be concise and "
        "don't provide explanations or reasons."
    )


def _join_and(items: Sequence[str]) -> str:
    """'a, b and c' as in the reference correction prompts."""
    return " and ".join(", ".join(items).rsplit(", ", 1)).lower()


def correction_prompt(missing: Sequence[str], wrong: Sequence[str]) -> str:
    """Correction instruction: ``missing`` findings to include, ``wrong`` ones to remove.

    Raises ValueError when both are empty (nothing to correct).
    """
    missing = [m for m in missing if m != "No Finding"]
    wrong = [w for w in wrong if w != "No Finding"]
    if missing and wrong:
        return (
            f"Please adapt the report with the following corrections: Include {_join_and(missing)} and "
            f"remove {_join_and(wrong)}. Don't make other changes."
        )
    if wrong:
        return f"The patient does not have {_join_and(wrong)}. Update the report. Don't make other changes."
    if missing:
        return f"The patient also has {_join_and(missing)}, correct the report. Don't make other changes."
    raise ValueError("a correction needs at least one missing or wrong finding")


def yes_no_prompt(finding: str) -> str:
    """Yes/no question about one finding, asked after the report."""
    return f"Is there any {finding.lower()}?"
