"""The serving engine on the tiny model (CPU): same greedy tokens as the simple path, dialog turns first,
cancel/failure isolation, no growth over many jobs, and the KV pool's slot bookkeeping (issue 9).

The tiny checkpoint is lively (``radialog model make-tiny``): report prompts differ in length (labels vary
with the image) and sequences end at different lengths, which frees slots mid-batch and moves the last
sequence down.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial
from itertools import islice

import pytest
import torch

from tests.support.lively_model import image
from workers.engine import Engine, EngineConfig, Handle, RequestCancelled
from workers.engine.decoder import Group, LlamaSteps
from workers.engine.kv_pool import KVPool, PoolShape
from workers.models.base import StudyInput, Turn
from workers.models.conversation import conversation_prompt
from workers.models.prompts import IMPRESSION, LIST_FINDINGS, VIEW_PROMPT, report_prompt, yes_no_prompt
from workers.models.radialog_v2.backend import RadialogV2Backend
from workers.models.radialog_v2.llava import IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS
from workers.models.radialog_v2.transforms import CLASSIFIER_CROP, LLM_CROP, batch_tensors


@pytest.fixture(scope="module")
def backend(tiny_backend: RadialogV2Backend) -> RadialogV2Backend:
    return tiny_backend


@pytest.fixture(scope="module")
def seeds(clear: list[int]) -> list[int]:
    return clear


# -- the simple path (references), cached: the backend is module-scoped and deterministic ---------------
@cache
def _ref_report(backend: RadialogV2Backend, seed: int, max_new: int, min_new: int | None):
    (out,) = backend.report([StudyInput(str(seed), image(seed))], max_new_tokens=max_new, min_new_tokens=min_new)
    prompt = backend.report_prompts([out.findings])[1][0]
    tokens = backend.generate([prompt], [image(seed)], max_new, min_new_tokens=min_new)[0]
    return out, prompt, tokens


@cache
def _ref_generate(backend: RadialogV2Backend, prompt: str, seed: int, max_new: int) -> list[int]:
    return backend.generate([prompt], [image(seed)], max_new)[0]


def _seed_answering_longer(
    backend: RadialogV2Backend,
    prompt: str,
    seeds: Sequence[int],
    longer_than: int,
    max_new: int,
    skip: Sequence[int] = (),
) -> int:
    """The first seed whose one-at-a-time answer to ``prompt`` is longer than ``longer_than`` tokens (the tiny
    model's answers end at random lengths; a test that needs a long one picks its image so)."""
    for seed in seeds:
        if seed not in skip and len(_ref_generate(backend, prompt, seed, max_new)) > longer_than:
            return seed
    raise AssertionError(f"no image gives an answer longer than {longer_than} tokens: the test would prove nothing")


def dialog_prompts() -> list[str]:
    """Mixed lengths: the view question, report turn + impression / yes-no, and a long history."""
    report_turn = Turn(report_prompt("cardiomegaly, pleural effusion"), "The heart is enlarged. Small effusions.")
    long_history = [report_turn] + [
        Turn(f"Question {i}: is there {x}? " + "Describe the lungs and the heart. " * 6, "No. " * (10 + 5 * i))
        for i, x in enumerate(["edema", "pneumothorax", "a fracture", "consolidation", "atelectasis"])
    ]
    return [
        conversation_prompt([], VIEW_PROMPT),
        conversation_prompt([report_turn], IMPRESSION),
        conversation_prompt([report_turn], yes_no_prompt("edema")),
        conversation_prompt(long_history, LIST_FINDINGS),
    ]


def assert_report_equal(backend: RadialogV2Backend, got, seed: int, max_new: int, min_new: int | None = None) -> None:
    ref, _, tokens = _ref_report(backend, seed, max_new, min_new)
    assert got.tokens == tokens, seed
    assert backend.decode(got.tokens) == ref.findings_text
    assert got.phrase == ref.findings_phrase
    assert [(f.label, f.present) for f in got.findings] == [(f.label, f.present) for f in ref.findings]
    # probabilities: equal up to the classifier's batch-size noise (the engine classifies its admitted group)
    assert [f.probability for f in got.findings] == pytest.approx([f.probability for f in ref.findings], abs=1e-2)
    assert got.finish == ("length" if len(tokens) == max_new else "eos")


# -- instrumentation: the engine's real steps, recorded -----------------------------------------------
class RecordingSteps(LlamaSteps):
    """LlamaSteps that record each call and can hold decode step ``hold_at`` until the test says go.

    Holding the engine thread inside a step makes "submit/cancel while the batch is decoding" exact
    without timing: the test acts while ``held`` is set, then sets ``go``.
    """

    def __init__(self, model, hold_at: int | None = None) -> None:
        super().__init__(model)
        self.calls: list[tuple] = []
        self.decodes = 0
        self.hold_at = hold_at
        self.held, self.go = threading.Event(), threading.Event()

    def prefill(self, embeds, pool: KVPool, slots: Sequence[int]) -> torch.Tensor:
        self.calls.append(("prefill", pool.name, len(slots), pool.used - len(slots)))
        return super().prefill(embeds, pool, slots)

    def decode(self, tokens: torch.Tensor, groups: Sequence[Group]) -> torch.Tensor:
        self.decodes += 1
        self.calls.append(("decode", {g.pool.name: len(g.slots) for g in groups}))
        if self.decodes == self.hold_at:
            go = self.go
            self.held.set()
            go.wait(120)
        return super().decode(tokens, groups)

    def hold_again(self, at: int) -> None:
        """While held (test thread): let the held step go and hold decode step ``at`` next."""
        go = self.go
        self.hold_at, self.held, self.go = at, threading.Event(), threading.Event()
        go.set()


class Rig:
    """An engine with recording steps and recorded slot moves; stopped (and never left held) at teardown."""

    def __init__(
        self,
        backend: RadialogV2Backend,
        config: EngineConfig,
        hold_at: int | None = None,
        steps: Callable[..., RecordingSteps] = RecordingSteps,
    ) -> None:
        self.engine = Engine(backend, config)
        self.steps = steps(backend.llava.language_model, hold_at)
        self.engine.steps = self.steps
        self.moves: list[tuple[str, int, int]] = []
        for pool in self.engine.pools.values():
            pool.release = self._recording_release(pool)
        self.engine.start()

    def _recording_release(self, pool: KVPool) -> Callable[[int, int], int | None]:
        release = pool.release

        def recorded(slot: int, last_length: int) -> int | None:
            moved = release(slot, last_length)
            if moved is not None:
                self.moves.append((pool.name, moved, slot))
            return moved

        return recorded

    def wait_held(self) -> None:
        assert self.steps.held.wait(60), "the engine never reached the held decode step"

    def assert_idle(self) -> None:
        engine = self.engine
        assert all(pool.used == 0 for pool in engine.pools.values())
        assert engine.live == {"report": [], "dialog": []}
        assert engine.busy == 0

    def close(self) -> None:
        self.steps.go.set()
        self.engine.stop()


@pytest.fixture
def rig(backend: RadialogV2Backend) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(
        hold_at: int | None = None,
        model: RadialogV2Backend | None = None,
        steps: Callable[..., RecordingSteps] = RecordingSteps,
        **config,
    ) -> Rig:
        made.append(Rig(model or backend, EngineConfig(**config), hold_at, steps))
        return made[-1]

    yield make
    for r in made:
        r.close()


def completion_order(handles: dict[str, Handle]) -> list[str]:
    """Names in the order their handles settle (callbacks run in the engine thread as each one ends)."""
    order: list[str] = []
    for name, handle in handles.items():
        handle.add_done_callback(lambda _h, name=name: order.append(name))
    return order


# -- 1. equality with the simple path ---------------------------------------------------------------
def test_reports_and_dialogs_equal_the_simple_path_token_for_token(backend, seeds, rig) -> None:
    """Reports join a running batch, slots are reused and compacted, dialogs of mixed lengths interleave:
    every request's tokens are those of the same prompt generated alone."""
    r = rig(hold_at=2, report_slots=3, dialog_slots=2)
    engine = r.engine
    first, later = seeds[:4], seeds[4:9]
    first_handles = engine.submit_reports([image(s) for s in first], max_new_tokens=32)
    r.wait_held()  # decode step 2 of the first batch: join it now
    assert engine.live["report"], "no report was decoding when the others joined"
    prompts = dialog_prompts()
    pieces: list[str] = []
    dialogs = [engine.submit_dialog(prompts[0], image(seeds[0]), 24, on_token=pieces.append)]
    later_handles = engine.submit_reports([image(s) for s in later], max_new_tokens=32)
    dialogs += [engine.submit_dialog(p, image(s), 24) for p, s in zip(prompts[1:], seeds[1:])]
    r.steps.go.set()

    for seed, handle in zip(first + later, first_handles + later_handles):
        assert_report_equal(backend, handle.result(120), seed, 32)
    for i, (p, s, handle) in enumerate(zip(prompts, seeds, dialogs)):
        got = handle.result(120)
        assert got.tokens == _ref_generate(backend, p, s, 24), i
    assert "".join(pieces) == backend.decode(dialogs[0].result().tokens)

    # the cases the test is about did happen
    report_prompts = {_ref_report(backend, s, 32, None)[1] for s in first + later}
    assert len({backend.count_tokens(p) for p in report_prompts}) >= 3, "report prompts of one length only"
    assert len({backend.count_tokens(p) for p in prompts}) == 4
    finishes = {h.result().finish for h in first_handles + later_handles}
    assert finishes == {"eos", "length"}
    joined = [c for c in r.steps.calls if c[:2] == ("prefill", "report") and c[3] > 0]
    assert joined, "no report was prefilled beside live reports"
    assert any(name == "report" for name, _, _ in r.moves), "no report slot was compacted"
    r.assert_idle()


# -- 2. dialog first ----------------------------------------------------------------------------------
def test_dialog_turn_overtakes_a_report_batch_and_caps_the_reports_beside_it(backend, seeds, rig) -> None:
    """prefill_tokens=1 admits one report per iteration, so report slots are still free (and reports still
    waiting) when the turn arrives: the engine must leave them waiting while the turn streams."""
    beside = 1
    r = rig(hold_at=4, report_slots=6, dialog_slots=1, reports_beside_dialog=beside, prefill_tokens=1)
    engine = r.engine
    studies = seeds[:12]
    reports = engine.submit_reports([image(s) for s in studies], max_new_tokens=32, min_new_tokens=32)
    r.wait_held()
    assert engine.step_count > 0 and len(engine.live["report"]) == 4 and engine.pools["report"].free == 2
    prompt = dialog_prompts()[1]
    dialog = engine.submit_dialog(prompt, image(seeds[0]), 16)
    order = completion_order({"dialog": dialog} | {f"report{i}": h for i, h in enumerate(reports)})
    r.steps.go.set()

    got = dialog.result(120)
    results = [h.result(120) for h in reports]
    assert order[0] == "dialog" and len(order) == 13, order
    assert got.tokens == _ref_generate(backend, prompt, seeds[0], 16)
    for seed, res in zip(studies, results):
        assert len(res.tokens) == 32
        assert_report_equal(backend, res, seed, 32, 32)

    calls = r.steps.calls
    with_dialog = [c[1] for c in calls if c[0] == "decode" and "dialog" in c[1]]
    assert with_dialog and all(rows.get("report", 0) <= beside for rows in with_dialog)
    assert any(rows.get("report", 0) == beside for rows in with_dialog), "the cap was never reached"
    start = calls.index(("prefill", "dialog", 1, 0))
    end = max(i for i, c in enumerate(calls) if c[0] == "decode" and "dialog" in c[1])
    assert not [c for c in calls[start:end] if c[0] == "prefill" and c[1] == "report"], "report prefill during the turn"
    # after the turn the paused reports decode again and the free slots fill up
    assert any(c[0] == "decode" and c[1].get("report", 0) == 6 for c in calls[end + 1 :])
    r.assert_idle()


# -- 3. cancel and failure isolation ------------------------------------------------------------------
def test_cancelling_a_running_and_a_waiting_report_leaves_the_others_untouched(backend, seeds, rig) -> None:
    r = rig(hold_at=3, report_slots=3, dialog_slots=1)
    engine = r.engine
    studies = seeds[:4]
    handles = engine.submit_reports([image(s) for s in studies], max_new_tokens=16, min_new_tokens=16)
    r.wait_held()
    running, waiting = handles[1], handles[3]
    (seq,) = [s for s in engine.live["report"] if s.request.handle is running]
    assert seq.tokens and seq.slot == 1  # mid-generation, not in the last slot: cancelling moves slot 2 down
    assert any(q.handle is waiting for q in engine.waiting["report"])
    running.cancel()
    waiting.cancel()
    r.steps.go.set()

    with pytest.raises(RequestCancelled, match="while generating"):
        running.result(120)
    with pytest.raises(RequestCancelled, match="before it started"):
        waiting.result(120)
    for i in (0, 2):
        assert_report_equal(backend, handles[i].result(120), studies[i], 16, 16)
    assert ("report", 2, 1) in r.moves
    assert not any(c[:2] == ("prefill", "report") and c[2] + c[3] > 3 for c in r.steps.calls)
    r.assert_idle()


class CallbackFailed(RuntimeError):
    pass


def test_a_dialog_whose_callback_raises_fails_alone(backend, seeds, rig) -> None:
    r = rig(hold_at=2, report_slots=2, dialog_slots=2)
    engine = r.engine
    studies = seeds[4:6]
    reports = engine.submit_reports([image(s) for s in studies], max_new_tokens=16, min_new_tokens=16)
    r.wait_held()
    boom = CallbackFailed("the client went away")
    seen: list[str] = []

    def on_token(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            raise boom

    prompt = dialog_prompts()[2]
    failing_seed = _seed_answering_longer(backend, prompt, seeds, 3, 16)  # it would have gone on
    failing = engine.submit_dialog(prompt, image(failing_seed), 16, on_token=on_token)
    healthy = engine.submit_dialog(dialog_prompts()[0], image(seeds[1]), 16)
    r.steps.go.set()

    with pytest.raises(CallbackFailed) as raised:
        failing.result(120)
    assert raised.value is boom and len(seen) == 3
    assert healthy.result(120).tokens == _ref_generate(backend, dialog_prompts()[0], seeds[1], 16)
    for seed, handle in zip(studies, reports):
        assert_report_equal(backend, handle.result(120), seed, 16, 16)
    r.assert_idle()


def test_stop_while_a_batch_decodes_cancels_everything_unfinished(backend, seeds, rig) -> None:
    """stop() ends the loop after the step in flight: live, waiting and just-submitted requests are
    cancelled, the slots are freed, the thread ends and new work is refused."""
    r = rig(hold_at=2, report_slots=2, dialog_slots=1)
    engine = r.engine
    reports = engine.submit_reports([image(s) for s in seeds[:4]], max_new_tokens=16, min_new_tokens=16)
    r.wait_held()
    assert engine.live["report"] and not any(h.done() for h in reports)
    dialog = engine.submit_dialog(dialog_prompts()[0], image(seeds[0]), 8)  # still in the inbox at the stop
    thread = engine._thread
    assert thread is not None
    engine.stop(timeout=0)  # ask without waiting: the engine thread is held inside a decode step
    with pytest.raises(RuntimeError, match="stopping"):
        engine.submit_dialog(dialog_prompts()[0], image(seeds[0]), 8)
    r.steps.go.set()
    thread.join(60)

    assert not thread.is_alive()
    for handle in [*reports, dialog]:
        with pytest.raises(RequestCancelled, match="the engine stopped"):
            handle.result(60)
    assert r.steps.decodes == 2  # no step after the one in flight
    with pytest.raises(RuntimeError, match="stopping"):
        engine.submit_reports([image(seeds[0])], max_new_tokens=4)
    r.assert_idle()


def test_cancelling_a_streaming_dialog_turn_leaves_the_reports_and_the_other_turn_untouched(
    backend, seeds, rig
) -> None:
    r = rig(hold_at=1, report_slots=3, dialog_slots=2)
    engine = r.engine
    studies = seeds[6:9]
    reports = engine.submit_reports([image(s) for s in studies], max_new_tokens=16, min_new_tokens=16)
    r.wait_held()
    prompts = dialog_prompts()
    doomed_prompt, other_prompt = prompts[3], prompts[1]
    doomed_seed = _seed_answering_longer(backend, doomed_prompt, seeds, 4, 24)
    other_seed = _seed_answering_longer(backend, other_prompt, seeds, 4, 24, skip=[doomed_seed])
    doomed_ref = _ref_generate(backend, doomed_prompt, doomed_seed, 24)
    other_ref = _ref_generate(backend, other_prompt, other_seed, 24)
    pieces: list[str] = []
    doomed = engine.submit_dialog(doomed_prompt, image(doomed_seed), 24, on_token=pieces.append)
    other = engine.submit_dialog(other_prompt, image(other_seed), 24)
    r.steps.hold_again(r.steps.decodes + 3)  # both turns are admitted together, then decode twice
    r.wait_held()
    live = engine.live["dialog"]
    assert [s.request.handle for s in live] == [doomed, other]
    assert live[0].tokens == doomed_ref[:3] and live[0].slot == 0  # streaming; cancelling moves slot 1 down
    assert len(engine.live["report"]) == 3
    streamed = len(pieces)
    doomed.cancel()
    r.steps.go.set()

    with pytest.raises(RequestCancelled, match="while generating"):
        doomed.result(120)
    assert len(pieces) <= streamed + 1  # at most the held step's token, nothing after the cancel
    assert other.result(120).tokens == other_ref
    for seed, handle in zip(studies, reports):
        assert_report_equal(backend, handle.result(120), seed, 16, 16)
    assert ("dialog", 1, 0) in r.moves
    r.assert_idle()


class MarkedStudy(RuntimeError):
    pass


class ClassifierFailsOnMarked(RadialogV2Backend):
    """The same loaded model (modules shared); its classifier fails on any batch holding ``marked``
    (the image's 488-px pixels)."""

    def __init__(self, backend: RadialogV2Backend, marked: torch.Tensor) -> None:
        super().__init__(backend.loaded)
        self.marked = marked
        self.batches: list[int] = []

    def classify(self, images, pixels=None):
        self.batches.append(len(pixels) if pixels is not None else len(images))
        if pixels is not None and any(torch.equal(row, self.marked) for row in pixels):
            raise MarkedStudy("the classifier failed on the marked study")
        return super().classify(images, pixels)


def _join_a_running_report(r: Rig, backend, first: int, group: Sequence[int]) -> tuple[Handle, list[Handle]]:
    """One report decoding (held at its first step) and then ``group`` submitted: admitted as one group."""
    (running,) = r.engine.submit_reports([image(first)], max_new_tokens=16, min_new_tokens=16)
    r.wait_held()
    handles = r.engine.submit_reports([image(s) for s in group], max_new_tokens=16, min_new_tokens=16)
    r.steps.go.set()
    return running, handles


def assert_only_marked_failed(
    backend, first: int, running: Handle, group: list[int], handles: list[Handle], marked: int
) -> None:
    """The marked study's handle raised; the running report and the rest of its group equal their references."""
    with pytest.raises(MarkedStudy):
        handles[marked].result(120)
    assert_report_equal(backend, running.result(120), first, 16, 16)
    for i, (seed, handle) in enumerate(zip(group, handles)):
        if i != marked:
            assert_report_equal(backend, handle.result(120), seed, 16, 16)


def test_a_report_admission_that_fails_for_one_study_fails_that_study_alone(backend, seeds, rig) -> None:
    group = seeds[9:13]
    marked = 2
    faulty = ClassifierFailsOnMarked(backend, batch_tensors([image(group[marked])], CLASSIFIER_CROP)[0])
    r = rig(hold_at=1, model=faulty, report_slots=6, dialog_slots=1)
    running, handles = _join_a_running_report(r, backend, seeds[0], group)

    assert_only_marked_failed(backend, seeds[0], running, group, handles, marked)
    assert faulty.batches == [1, 4, 1, 1, 1, 1]  # the group failed, then one by one
    r.assert_idle()


class PrefillFailsOnMarked(RecordingSteps):
    """Prefill that fails after writing the cache, for any batch holding a marked row: one whose image
    features (from position ``at``) are ``marked``'s."""

    def __init__(self, model, hold_at: int | None, marked: torch.Tensor, at: int) -> None:
        super().__init__(model, hold_at)
        self.marked, self.at = marked, at

    def prefill(self, embeds, pool: KVPool, slots: Sequence[int]) -> torch.Tensor:
        logits = super().prefill(embeds, pool, slots)
        span = slice(self.at, self.at + NUM_IMAGE_TOKENS)
        if any(torch.allclose(row[span], self.marked, atol=1e-4) for row in embeds):
            raise MarkedStudy("prefill failed on the marked study")
        return logits


def test_a_prefill_that_fails_for_one_study_fails_that_study_alone(backend, seeds, rig) -> None:
    group = seeds[9:13]
    marked = 1
    with torch.inference_mode():
        features = backend.llava.encode_images(batch_tensors([image(group[marked])], LLM_CROP))[0]
    at = backend.prompt_ids(_ref_report(backend, group[marked], 16, 16)[1]).index(IMAGE_TOKEN_INDEX)
    r = rig(hold_at=1, steps=partial(PrefillFailsOnMarked, marked=features, at=at), report_slots=6, dialog_slots=1)
    running, handles = _join_a_running_report(r, backend, seeds[0], group)

    assert_only_marked_failed(backend, seeds[0], running, group, handles, marked)
    prefills = [c[2:] for c in r.steps.calls if c[0] == "prefill"]
    # the group (after the running report) failed, then one by one: the marked row's slot is given back
    assert prefills == [(1, 0), (4, 1), (1, 1), (1, 2), (1, 2), (1, 3)]
    r.assert_idle()


# -- 4. memory over many jobs -------------------------------------------------------------------------
#: Traced growth allowed between job 50 and job 200. Measured without a leak: 30-40 KB, flattening off as
#: CPython's free lists and torch's small internal allocations fill up (15.6 KB for jobs 100-200, 5 KB for
#: jobs 300-400). A report result kept per job is >= 2 KB (14 ClassifierFinding objects, the timings dict,
#: the token list), i.e. >= 300 KB over 150 jobs; a dialog's >= 600 B. Per-object leaks of any size are
#: caught exactly by the object counts below; this bound catches what grows inside one object (a list or
#: dict of per-job entries) once it passes ~650 B a job.
MEMORY_GROWTH_BOUND = 96 * 1024
#: New gc-tracked objects of one type allowed over those 150 jobs: one per job (150) would be a leak.
OBJECT_GROWTH_BOUND = 50


def _wave(engine: Engine, seeds: Sequence[int], wave: int) -> int:
    """8 short reports and 2 dialog turns at once; waits for all of them. Returns the number of jobs."""
    studies = [seeds[(wave + i) % len(seeds)] for i in range(8)]
    handles = engine.submit_reports([image(s) for s in studies], max_new_tokens=3)
    prompts = dialog_prompts()
    handles += [engine.submit_dialog(prompts[(wave + i) % 4], image(studies[i]), 3) for i in range(2)]
    for handle in handles:
        handle.result(120)
    return len(handles)


def _until_engine_idle(engine: Engine) -> None:
    """Wait until the engine thread sleeps for work: a handle is settled while the thread still runs the
    rest of its step, whose locals (the finished batch, its findings) would otherwise count as growth."""
    thread = engine._thread
    assert thread is not None and thread.ident is not None
    for _ in range(1000):
        frame = sys._current_frames().get(thread.ident)
        names = set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        if "_take_inbox" in names and engine.busy == 0:
            return
        time.sleep(0.01)
    raise AssertionError("the engine did not go idle")


def _object_counts() -> Counter[str]:
    gc.collect()
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def test_memory_does_not_grow_over_200_jobs(backend, seeds) -> None:
    engine = Engine(backend, EngineConfig(report_slots=4, dialog_slots=2)).start()
    try:
        jobs = sum(_wave(engine, seeds, wave) for wave in range(5))
        assert jobs == 50
        _until_engine_idle(engine)
        _object_counts()  # the first scan itself leaves ~60 objects behind (lazy attributes it touches)
        objects_at_50 = _object_counts()
        tracemalloc.start()
        try:
            gc.collect()
            at_50 = tracemalloc.get_traced_memory()[0]
            jobs += sum(_wave(engine, seeds, wave) for wave in range(5, 20))
            _until_engine_idle(engine)
            gc.collect()
            at_200 = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        grown = {name: n for name, n in (_object_counts() - objects_at_50).items() if n >= OBJECT_GROWTH_BOUND}
        assert jobs == 200
        assert not grown, grown
        assert at_200 - at_50 < MEMORY_GROWTH_BOUND, (at_50, at_200)
        assert all(pool.used == 0 for pool in engine.pools.values())
        assert engine.busy == 0 and engine.live == {"report": [], "dialog": []}
        assert not engine.waiting["report"] and not engine.waiting["dialog"]
    finally:
        engine.stop()


# -- 5. the KV pool --------------------------------------------------------------------------------------
def test_kv_pool_moves_only_the_last_slots_tokens_and_refuses_misuse() -> None:
    pool = KVPool(
        "t", PoolShape(layers=2, kv_heads=2, head_dim=4), slots=3, max_len=6, dtype=torch.float32, device="cpu"
    )
    assert pool.take(3) == [0, 1, 2] and pool.free == 0
    for slot in range(3):
        pool.k[:, slot] = slot + 1
        pool.v[:, slot] = -(slot + 1)
    with pytest.raises(RuntimeError, match="free slots"):
        pool.take(1)

    assert pool.release(0, last_length=4) == 2  # slot 2 (4 tokens) moves into slot 0
    assert pool.used == 2
    assert torch.all(pool.k[:, 0, :, :4] == 3) and torch.all(pool.v[:, 0, :, :4] == -3)
    assert torch.all(pool.k[:, 0, :, 4:] == 1) and torch.all(pool.v[:, 0, :, 4:] == -1)  # beyond: untouched
    assert torch.all(pool.k[:, 1] == 2)
    with pytest.raises(ValueError, match="not live"):
        pool.release(2, last_length=1)
    assert pool.release(1, last_length=5) is None  # the last slot: nothing moves
    assert torch.all(pool.k[:, 0, :, :4] == 3) and pool.used == 1
    assert pool.take(2) == [1, 2]
    with pytest.raises(RuntimeError):
        pool.take(1)
    with pytest.raises(ValueError):
        KVPool("bad", PoolShape(1, 1, 1), slots=0, max_len=4, dtype=torch.float32, device="cpu")


def test_a_sequence_that_fills_its_slot_ends_with_length(backend, seeds, rig) -> None:
    prompt = dialog_prompts()[1]
    positions = backend.count_tokens(prompt)
    room = 4
    seed = _seed_answering_longer(backend, prompt, seeds, room + 1, 32)
    ref = _ref_generate(backend, prompt, seed, 32)
    r = rig(report_slots=1, dialog_slots=1, dialog_max_len=positions + room)
    got = r.engine.submit_dialog(prompt, image(seed), 32).result(120)
    # the prefill's token, then one per cached position left: all equal to the unbounded run's start
    assert got.finish == "length" and got.tokens == ref[: room + 1]
    with pytest.raises(ValueError, match="dialog slots hold"):
        r.engine.submit_dialog(prompt + " Why?" * 4, image(seed), 8)
    r.assert_idle()


# -- 6. min_new_tokens ----------------------------------------------------------------------------------
def test_min_new_tokens_holds_back_eos(backend, seeds, rig) -> None:
    n = 20
    early = list(islice((s for s in seeds if len(_ref_report(backend, s, n, None)[2]) < n), 3))
    assert len(early) == 3, "no image whose report ends early: the test would prove nothing"
    r = rig(report_slots=3, dialog_slots=1)
    forced = r.engine.submit_reports([image(s) for s in early], max_new_tokens=n, min_new_tokens=n)
    partly = r.engine.submit_reports([image(s) for s in early], max_new_tokens=n, min_new_tokens=8)
    for seed, handle in zip(early, forced):
        got = handle.result(120)
        assert len(got.tokens) == n and got.finish == "length"
        assert_report_equal(backend, got, seed, n, n)
    for seed, handle in zip(early, partly):
        got = handle.result(120)
        assert len(got.tokens) >= 8
        assert_report_equal(backend, got, seed, n, 8)
    r.assert_idle()


def test_a_report_limit_beyond_the_slots_is_refused_up_front(backend, seeds) -> None:
    """Asking for more new tokens than a report slot holds is an error at submit, not a silently short report."""
    engine = Engine(backend, EngineConfig(report_slots=1, dialog_slots=1))
    room = engine.pools["report"].max_len - engine.longest_report_prompt() - 1
    with pytest.raises(ValueError, match="do not fit the report slots"):
        engine.submit_reports([image(seeds[0])], max_new_tokens=room + 1)
    assert engine.busy == 0


# -- 7. priority ----------------------------------------------------------------------------------------
def test_an_urgent_report_is_admitted_before_waiting_routine_ones(backend, seeds, rig) -> None:
    """Two routine reports fill the slots; four more routine ones wait, then one HIGH (rank 0) arrives: it is
    admitted at the first free slot, ahead of every routine one that had not started (issue 19)."""
    r = rig(hold_at=2, report_slots=2, dialog_slots=1)
    engine = r.engine
    running = engine.submit_reports([image(s) for s in seeds[:2]], max_new_tokens=12, min_new_tokens=12)
    r.wait_held()
    waiting = engine.submit_reports(
        [image(s) for s in seeds[2:6]], max_new_tokens=12, min_new_tokens=12, priorities=[1, 1, 1, 1]
    )
    urgent = engine.submit_reports([image(seeds[6])], max_new_tokens=12, min_new_tokens=12, priorities=[0])
    order = completion_order(
        {"run0": running[0], "run1": running[1], "urgent": urgent[0]} | {f"wait{i}": h for i, h in enumerate(waiting)}
    )
    r.steps.go.set()
    for handle in running + waiting + urgent:
        assert len(handle.result(120).tokens) == 12
    assert set(order[:2]) == {"run0", "run1"}, order
    assert order.index("urgent") < min(order.index(f"wait{i}") for i in (1, 2, 3)), order
    assert order.index("urgent") <= 3, order
    # the HIGH study's report is the one it would be alone
    assert_report_equal(backend, urgent[0].result(), seeds[6], 12, 12)
    r.assert_idle()
