"""RaDialog v1 served by the engine (issue 17): reports joining a running batch and dialog turns of mixed lengths
give, token for token, what one-at-a-time generation gives (and the same findings and phrase), with the
32-placeholder splice. The tiny set is lively as written (labels vary with the image, answers end at different
lengths), so these comparisons can fail."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from functools import cache

import pytest

from tests.support.lively_model import clear_seeds, image
from tests.test_engine import RecordingSteps
from workers.engine import Engine, EngineConfig
from workers.engine.engine import served_model
from workers.models.base import ClassifierFinding, StudyInput, Turn
from workers.models.conversation import conversation_prompt
from workers.models.prompts import CHEXPERT_LABELS, yes_no_prompt
from workers.models.radialog_v1 import prompts
from workers.models.radialog_v1.backend import RadialogV1Backend, load_radialog_v1_backend
from workers.models.radialog_v1.tiny import make_tiny

MAX_NEW = 24


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> RadialogV1Backend:
    paths = make_tiny(tmp_path_factory.mktemp("radialog-v1"))
    return load_radialog_v1_backend(paths.root, None, paths.llm_dir, paths.biovil, "cpu")


@pytest.fixture(scope="module")
def seeds(backend: RadialogV1Backend) -> list[int]:
    return clear_seeds(backend, minimum=8)[:8]  # type: ignore[arg-type]  (duck-typed: uses .classifier)


@cache
def _alone_report(backend: RadialogV1Backend, seed: int):  # -> (ReportOutput, tokens)
    (out,) = backend.report([StudyInput(str(seed), image(seed))], max_new_tokens=MAX_NEW)
    _, (prompt,) = backend.report_prompts([out.findings])
    return out, tuple(backend.generate([prompt], [image(seed)], MAX_NEW)[0])


@cache
def _alone(backend: RadialogV1Backend, prompt: str, seed: int, max_new: int) -> tuple[int, ...]:
    return tuple(backend.generate([prompt], [image(seed)], max_new)[0])


def dialog_prompts() -> list[tuple[str, int]]:
    """(prompt, token limit): yes/no (10 tokens), list (30), a long history with a free question."""
    report = Turn(prompts.report_prompt("cardiomegaly, pleural effusion"), "The heart is enlarged. Small effusions.")
    chatter = [Turn(f"Question {i}: " + "Describe the lungs. " * (2 + i), "No. " * (3 + 2 * i)) for i in range(3)]
    return [
        (conversation_prompt([report], yes_no_prompt("Edema")), prompts.TASK_MAX_NEW_TOKENS["yes_no"]),
        (conversation_prompt([report], prompts.LIST_FINDINGS), prompts.TASK_MAX_NEW_TOKENS["list"]),
        (conversation_prompt([report, *chatter], "Is the heart enlarged?"), MAX_NEW),
    ]


@pytest.fixture
def engine(backend: RadialogV1Backend) -> Iterator[Engine]:
    made = Engine(backend, EngineConfig(report_slots=3, dialog_slots=2))
    made.steps = RecordingSteps(made.model.language_model, hold_at=2)
    made.start()
    yield made
    made.steps.go.set()
    made.stop()


def test_reports_joining_mid_batch_and_dialogs_equal_one_at_a_time(
    backend: RadialogV1Backend, engine: Engine, seeds: list[int]
) -> None:
    first, later = seeds[:2], seeds[2:]
    first_handles = engine.submit_reports([image(s) for s in first], max_new_tokens=MAX_NEW)
    assert engine.steps.held.wait(120), "the engine never reached the held decode step"
    assert engine.live["report"], "no report was decoding when the others joined"
    later_handles = engine.submit_reports([image(s) for s in later], max_new_tokens=MAX_NEW)  # one free slot
    engine.steps.hold_again(5)  # dialog turns arrive while reports decode (they then go first)
    assert engine.steps.held.wait(120), "the engine never reached the second held decode step"
    pieces: list[str] = []
    dialogs = dialog_prompts()
    dialog_handles = [engine.submit_dialog(dialogs[0][0], image(seeds[0]), dialogs[0][1], on_token=pieces.append)]
    dialog_handles += [engine.submit_dialog(p, image(seeds[i + 1]), limit) for i, (p, limit) in enumerate(dialogs[1:])]
    engine.steps.go.set()

    finishes: Counter[str] = Counter()
    phrases = set()
    for seed, handle in zip(first + later, first_handles + later_handles):
        got = handle.result(300)
        ref, tokens = _alone_report(backend, seed)
        assert tuple(got.tokens) == tokens, seed
        assert got.phrase == ref.findings_phrase and backend.decode(got.tokens) == ref.findings_text
        assert [(f.label, f.present) for f in got.findings] == [(f.label, f.present) for f in ref.findings]
        finishes[got.finish] += 1
        phrases.add(got.phrase)
    for i, ((prompt, limit), handle) in enumerate(zip(dialogs, dialog_handles)):
        got = handle.result(300)
        assert tuple(got.tokens) == _alone(backend, prompt, seeds[i], limit), i
        assert len(got.tokens) <= limit
        finishes[got.finish] += 1
    assert "".join(pieces) == backend.decode(dialog_handles[0].result().tokens)

    # the cases the test is about did happen
    assert finishes["eos"] >= 2 and finishes["length"] >= 2, finishes
    assert len(phrases) > 2, "the findings do not depend on the image"
    joined = [c for c in engine.steps.calls if c[:2] == ("prefill", "report") and c[3] > 0]
    assert joined, "no report was prefilled beside live reports"
    assert engine.pools["dialog"].max_len == 2048  # Vicuna v1.3's positions


def test_the_served_model_is_sized_from_the_backend(backend: RadialogV1Backend) -> None:
    served = served_model(backend)
    assert served.max_positions == 2048 and served.stop_sequences == ()
    _, (everything,) = backend.report_prompts([[ClassifierFinding(label, 1.0, True) for label in CHEXPERT_LABELS]])
    assert served.longest_report_positions() == backend.count_tokens(everything) == len(backend.prompt_ids(everything))
    assert served.report_token_limit() == 32  # the tiny cap
