"""The exact prompt strings RaDialog v2 was instruction-tuned on (torch-free: the API imports this).

Strings follow the published v2 code (demo, evaluation script, downstream-task prompts). A changed comma
changes what the model generates, so tests compare these byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from radialog.chexpert import CHEXPERT_LABELS

#: Vicuna v1.1 system text with RaDialog's radiologist persona.
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant acting as an experienced "
    "radiologist. The assistant gives professional, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP = " "  # after the system text and after each user turn
SEP2 = "</s>"  # after each assistant answer
IMAGE_PLACEHOLDER = "<image>"
#: Projected image embeddings spliced in place of the placeholder (14 x 14 patch grid at 448 px).
IMAGE_TOKENS = 196

NO_COMMON_FINDINGS = "no common findings"

LIST_FINDINGS = "List all the findings in this report."
IMPRESSION = "Write the impression section corresponding to this radiology report."
EASY_LANGUAGE = "Reformulate the radiology report in easy language for a patient to understand."
SUMMARY = "Summarize this radiology report in one or two sentences."
#: Asked as the FIRST turn instead of the report prompt, hence it carries the image.
VIEW_PROMPT = "<image> From what view was this image taken?"

#: New tokens per answer, per task: the reference's own values. Its v2 evaluation (test.py) generates up
#: to 300 new tokens for every task it evaluates (report, correction, yes/no, list, impression, view);
#: its demo allows 600 for everything else asked in a chat (easy language, summary, free questions).
#: An answer that reaches the limit is cut mid-sentence, so a lower cap is never a silent default.
TASK_MAX_NEW_TOKENS: dict[str, int] = {
    "report": 300,
    "correction": 300,
    "yes_no": 300,
    "list": 300,
    "impression": 300,
    "view": 300,
    "easy_language": 600,
    "summary": 600,
    "free": 600,
}
#: The reference demo refuses conversations longer than this (it counts prompt and answers). Dropping the
#: oldest follow-up turns to fit (workers.models.conversation.fit_history) is our rule, not the reference's.
MAX_CONTEXT_TOKENS = 4000


def findings_phrase(labels: Iterable[str]) -> str:
    """The "Predicted Findings" text from the classifier's positive labels (CheXpert order kept).

    As in the reference evaluation: "No Finding" is dropped when a finding other than "Support Devices"
    is present; nothing positive gives "no common findings".
    """
    present = list(labels)
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


def chexpert_label(finding: str) -> str:
    """The CheXpert label as written ("Pleural Effusion") for any capitalisation of it; ValueError otherwise."""
    for label in CHEXPERT_LABELS:
        if label.lower() == finding.strip().lower():
            return label
    raise ValueError(f"{finding!r} is not a CheXpert finding")


def _in_chexpert_order(findings: Iterable[str]) -> list[str]:
    """Known labels, each once, in CheXpert order (the reference builds its lists from the label vector)."""
    present = {chexpert_label(f) for f in findings}
    return [label for label in CHEXPERT_LABELS if label in present and label != "No Finding"]


def correction_prompt(missing: Iterable[str], wrong: Iterable[str]) -> str:
    """Correction instruction: ``missing`` findings to include, ``wrong`` ones to remove.

    Findings are CheXpert labels in any capitalisation; they are put in CheXpert order and lower-cased,
    as in the reference (which lists false negatives / positives from the label vector). "No Finding" is
    ignored. Raises ValueError when nothing is left to correct or a finding is not a CheXpert label.
    """
    missing, wrong = _in_chexpert_order(missing), _in_chexpert_order(wrong)
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
    """Yes/no question about one finding, asked after the report, with the CheXpert label as written:
    "Is there any Pleural Effusion?" (the reference's training template and evaluation both do so)."""
    return f"Is there any {chexpert_label(finding)}?"
