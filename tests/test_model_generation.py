"""Generation on the tiny model through the real loader: determinism, batching, streaming, context, tokens.

Batched-vs-alone comparisons need a lively model (make-tiny's is: labels vary with the image, answers end
at different lengths); on a flat one a padding or KV-cache mix-up would still give "equal" tokens. Those
tests also assert that their prompts differ in length and their answers end at different lengths, so they
say when they have become degenerate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radialog.settings import Settings
from radialog.synthetic import chest_pixels
from tests.support.lively_model import image as lively_image
from workers.models import load_backend
from workers.models.base import ContextTooLong, DialogRequest, StudyInput, Turn
from workers.models.prompts import IMPRESSION, LIST_FINDINGS, SYSTEM, VIEW_PROMPT, report_prompt, yes_no_prompt
from workers.models.radialog_v2.backend import RadialogV2Backend, load_radialog_v2
from workers.models.radialog_v2.llava import IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS


@pytest.fixture(scope="module")
def backend(tiny_backend: RadialogV2Backend) -> RadialogV2Backend:
    """The tiny checkpoint, as loaded."""
    return tiny_backend


def image(seed: int, rows: int = 600, cols: int = 520) -> np.ndarray:
    return (chest_pixels(rows, cols, 8, seed=seed)).astype(np.uint8)


def test_load_backend_from_settings(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, model_dir=tiny_model[0], base_model_dir=tiny_model[1], device="cpu")
    backend = load_backend(settings)
    assert backend.provenance.name == "RaDialog-LLaVA"
    assert backend.provenance.tiny is True
    assert backend.provenance.device == "cpu" and backend.provenance.dtype == "float32"


def test_tokenizer_matches_sentencepiece_and_llava_image_tokenisation(backend: RadialogV2Backend, tiny_model) -> None:
    """The reference uses the slow sentencepiece tokenizer: ids must be the same; <image> -> -200."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_model[1] / "tokenizer.model"))
    text = f"{SYSTEM} USER: {LIST_FINDINGS} ASSISTANT:"
    assert backend.tokenizer(text).input_ids == [1, *sp.encode(text)]
    ids = backend.prompt_ids(f"{SYSTEM} USER: {report_prompt('edema')} ASSISTANT:")
    before, after = f"{SYSTEM} USER: ", report_prompt("edema").removeprefix("<image>") + " ASSISTANT:"
    assert ids == [1, *sp.encode(before), IMAGE_TOKEN_INDEX, *sp.encode(after)]
    assert (
        backend.count_tokens(f"{SYSTEM} USER: {report_prompt('edema')} ASSISTANT:") == len(ids) - 1 + NUM_IMAGE_TOKENS
    )


def test_report_is_deterministic_and_complete(backend: RadialogV2Backend, tiny_model) -> None:
    studies = [StudyInput("a", image(1)), StudyInput("b", image(2, 700, 640))]
    first = backend.report(studies, max_new_tokens=40)
    again = load_radialog_v2(*tiny_model, device="cpu").report(studies, max_new_tokens=40)
    assert [o.key for o in first] == ["a", "b"]
    assert [o.findings_text for o in first] == [o.findings_text for o in again]
    for out in first:
        assert out.findings_text and out.generated_tokens > 0
        assert [f.label for f in out.findings][0] == "No Finding" and len(out.findings) == 14
        assert out.findings_phrase
        assert set(out.timings) >= {"classifier", "generate"}


def test_batched_generation_equals_one_by_one(backend: RadialogV2Backend, clear: list[int]) -> None:
    """Left-padded batch with mixed prompt lengths gives exactly the one-at-a-time greedy tokens."""
    history = [Turn(report_prompt("cardiomegaly"), "The heart is enlarged. The lungs are clear.")]
    prompts = [
        f"{SYSTEM} USER: {report_prompt('no common findings')} ASSISTANT:",
        f"{SYSTEM} USER: {report_prompt('enlarged cardiomediastinum, cardiomegaly, pleural effusion')} ASSISTANT:",
        f"{SYSTEM} USER: {history[0].question} ASSISTANT: {history[0].answer}</s>USER: {IMPRESSION} ASSISTANT:",
        f"{SYSTEM} USER: {VIEW_PROMPT} ASSISTANT:",
    ]
    images = [lively_image(s) for s in clear[:4]]
    batched = backend.generate(prompts, images, 24)
    single = [backend.generate([p], [im], 24)[0] for p, im in zip(prompts, images)]
    assert batched == single
    # not degenerate: every prompt is padded differently, some answers end (EOS) while others go on
    assert len({len(backend.prompt_ids(p)) for p in prompts}) == 4
    assert len({len(t) for t in single}) >= 3 and min(len(t) for t in single) < 24, single
    assert len({t[0] for t in single}) >= 2, single


def test_report_does_not_depend_on_batch_companions(backend: RadialogV2Backend, clear: list[int]) -> None:
    """A study's report is its report alone, beside a study with a longer prompt (it is left-padded) and
    beside one with a shorter prompt (it pads the other), the companions' answers ending elsewhere."""
    alone = {s: backend.report([StudyInput(str(s), lively_image(s))], max_new_tokens=40)[0] for s in clear}
    length = {s: backend.count_tokens(backend.report_prompts([out.findings])[1][0]) for s, out in alone.items()}
    by_length = sorted(clear, key=length.__getitem__)
    a = by_length[len(by_length) // 2]
    others = [s for s in by_length if alone[s].generated_tokens != alone[a].generated_tokens]
    longest, shortest = others[-1], others[0]
    assert length[shortest] < length[a] < length[longest], (length, a, shortest, longest)
    a_, b_, c_ = (StudyInput(str(s), lively_image(s)) for s in (a, longest, shortest))
    with_b = backend.report([a_, b_], max_new_tokens=40)[0]
    with_c = backend.report([c_, a_], max_new_tokens=40)[1]
    for got in (with_b, with_c):
        assert got.findings_text == alone[a].findings_text
        assert [(f.label, f.present) for f in got.findings] == [(f.label, f.present) for f in alone[a].findings]
    assert with_b.findings == with_c.findings  # same batch size: the classifier's figures are equal too
    assert len({alone[s].findings_phrase for s in (a, longest, shortest)}) == 3


def test_streaming_pieces_add_up_to_the_answer(backend: RadialogV2Backend) -> None:
    pieces: list[str] = []
    request = DialogRequest(
        image=image(3),
        history=[Turn(report_prompt("edema"), "Mild edema.")],
        question=yes_no_prompt("edema"),
        task="list",
    )
    answer = backend.answer(request, on_token=pieces.append)
    assert answer == backend.answer(request)
    assert len(pieces) > 1
    assert "".join(pieces).strip() == answer


def test_dialog_without_image_turn_is_refused(backend: RadialogV2Backend) -> None:
    with pytest.raises(ValueError, match="image placeholder"):
        backend.answer(DialogRequest(image=image(3), history=[], question="Hello?"))


def test_view_question_as_first_turn(backend: RadialogV2Backend) -> None:
    answer = backend.answer(DialogRequest(image=image(3), history=[], question=VIEW_PROMPT, task="view"))
    assert isinstance(answer, str)


def test_context_limit_drops_old_turns_then_refuses(backend: RadialogV2Backend) -> None:
    report = Turn(report_prompt("edema"), "Mild edema.")
    long_turns = [Turn(f"Question {i}? " + "heart lungs " * 300, "yes " * 200) for i in range(6)]
    answer = backend.answer(DialogRequest(image(3), [report, *long_turns], LIST_FINDINGS, task="list"))
    assert isinstance(answer, str)
    with pytest.raises(ContextTooLong):
        backend.answer(DialogRequest(image(3), [report], "heart " * 5000, task="free"))


def test_report_uses_the_reference_conversation_prompt(backend: RadialogV2Backend) -> None:
    """Report = greedy answer to "{SYSTEM} USER: {report prompt} ASSISTANT:" with the classifier's phrase."""
    from workers.models.conversation import conversation_prompt

    study = StudyInput("a", image(9))
    (out,) = backend.report([study], max_new_tokens=20)
    expected = backend.generate([conversation_prompt([], report_prompt(out.findings_phrase))], [study.image], 20)[0]
    assert out.findings_text == backend.decode(expected)
    (forced,) = backend.report([study], max_new_tokens=30, min_new_tokens=30)
    assert forced.generated_tokens == 30


def test_static_cache_option_gives_the_same_tokens(backend: RadialogV2Backend, clear: list[int]) -> None:
    prompts = [f"{SYSTEM} USER: {report_prompt(p)} ASSISTANT:" for p in ("edema", "no common findings")]
    images = [lively_image(s) for s in clear[4:6]]
    dynamic = backend.generate(prompts, images, 12)
    assert dynamic[0] != dynamic[1]
    backend.generate_options = {"cache_implementation": "static"}
    try:
        assert backend.generate(prompts, images, 12) == dynamic
    finally:
        backend.generate_options = {}


def test_tiny_model_answers_are_capped(backend: RadialogV2Backend) -> None:
    from workers.models.radialog_v2.backend import TINY_MAX_NEW_TOKENS

    (out,) = backend.report([StudyInput("a", image(13))])
    assert 0 < out.generated_tokens <= TINY_MAX_NEW_TOKENS


def test_tiny_model_is_lively(backend: RadialogV2Backend, clear: list[int], tiny_model) -> None:
    """make-tiny's model can catch slips: labels vary with the image; answers are varied tokens that end
    (</s>) at different lengths, are never empty, and hold no <unk>, <s>, byte-fallback piece or control
    character (the demo prints them)."""
    import re

    from workers.models.radialog_v2.backend import TINY_MAX_NEW_TOKENS
    from workers.models.tiny_llama import silent_token_ids

    images = [lively_image(s) for s in clear]
    phrases, prompts = backend.report_prompts(backend.classify(images))
    assert len(set(phrases)) >= len(clear) // 2, phrases
    follow_ups = [
        f"{prompt} The heart is normal.</s>USER: {question} ASSISTANT:"
        for prompt, question in zip(prompts, [LIST_FINDINGS, IMPRESSION, yes_no_prompt("Edema"), " Why?"] * 9)
    ]
    answers = backend.generate(prompts + follow_ups, images + images, TINY_MAX_NEW_TOKENS)
    lengths = [len(a) for a in answers]
    assert min(lengths) >= 1 and max(lengths) == TINY_MAX_NEW_TOKENS, lengths
    assert sum(n < TINY_MAX_NEW_TOKENS for n in lengths) >= len(answers) // 4, lengths
    assert len(set(lengths)) >= 6, lengths
    assert all(len(set(a)) >= len(a) // 3 for a in answers), answers  # no single token repeated throughout
    assert len({a[0] for a in answers}) >= 4
    silent = set(silent_token_ids(tiny_model[1] / "tokenizer.model"))
    assert not silent & {t for a in answers for t in a}
    for answer in answers:
        text = backend.decode(answer)
        assert text and not re.search(r"[\x00-\x1f\x7f\ufffd]", text), text
