"""RaDialog v1's prompt text, exactly as its evaluation (``test.py``) and training data build it (torch-free).

The conversation is Vicuna v1.1's, the same as v2's (:func:`workers.models.conversation.conversation_prompt`,
system text with the radiologist persona, " " after the system text and each question, "</s>" after each
answer). What differs from v2 is the report instruction: the image is 32 ``<IMG>`` placeholders after the
words "Image information: " (v2 has LLaVA's single ``<image>``), and the Q-Former's 32 query outputs replace
exactly those 32 positions. The findings phrase follows ``test.py`` (the training data's format): positive
labels in CheXpert order, "No Finding" dropped when anything but "Support Devices" is also present,
lower-cased and joined with ", "; nothing positive is "no common findings" -- the rule v2 shares
(:func:`workers.models.prompts.findings_phrase`).

Follow-up tasks are those RaDialog-INS was instruction-tuned on (``data/instruct_prompts``: correction,
yes/no, list, easy language, summary; no impression, no view question); the quick actions use one phrasing
from each task's set. New-token limits are ``test.py``'s per task (300 report, 256 correction, 10 yes/no,
30 list) and the demo's 300 for everything else. A changed character changes what the model generates, so
tests compare these byte for byte.
"""

from __future__ import annotations

from workers.models import prompts as v2

#: The test/training system text (test.py, data/create_data.py); equal to v2's.
SYSTEM = v2.SYSTEM
IMAGE_TOKEN = "<IMG>"
#: The id the reference's tokenizer gives ``<IMG>`` (added after Vicuna's 32,000 pieces) and that its
#: modified Llama splits the prompt at (``split_at_img`` hard-codes 32000).
IMAGE_TOKEN_ID = 32000
#: Q-Former query outputs spliced in place of the placeholders.
IMAGE_TOKENS = 32
IMAGE_RUN = IMAGE_TOKEN * IMAGE_TOKENS

#: Quick actions in a phrasing RaDialog-INS was trained on (one line of each task's prompt file).
LIST_FINDINGS = v2.LIST_FINDINGS  # "List all the findings in this report." (test.py's findings QA)
EASY_LANGUAGE = "Translate this report to easy language for a patient to understand."
SUMMARY = "Please summarize the given report in maximum two sentences."

#: New tokens per task: test.py's evaluation limits, the demo's 300 for the rest.
TASK_MAX_NEW_TOKENS: dict[str, int] = {
    "report": 300,
    "correction": 256,
    "yes_no": 10,
    "list": 30,
    "easy_language": 300,
    "summary": 300,
    "free": 300,
}
#: Vicuna-7B v1.3's context (max_position_embeddings): prompt + new tokens must fit.
MAX_CONTEXT_TOKENS = 2048


def report_prompt(findings: str) -> str:
    """The report instruction (vicuna_prompts.json ``img_matching_examples_ig2_noexamples_IMG_findings``)."""
    return (
        f"Image information: {IMAGE_RUN}. Predicted Findings: {findings}. You are to act as a radiologist and "
        "write the finding section of a chest x-ray radiology report for this X-ray image and the given predicted "
        "findings. Write in the style of a radiologist, write one fluent text without enumeration, be concise and "
        "don't provide explanations or reasons."
    )


def findings_phrase(labels: list[str] | tuple[str, ...]) -> str:
    """test.py's findings phrase from the classifier's positive labels (CheXpert order kept)."""
    return v2.findings_phrase(labels)
