"""The engine thread: admits requests between decode steps, dialog first, and decodes every live sequence.

The model is any backend's :class:`~workers.engine.model.EngineModel`: it turns requests into rows of
Llama input embeddings (RaDialog v2: classifier, BioViL-T, LLaVA splice; XrayGPT: EVA ViT-g, Q-Former,
``<ImageHere>`` splice) and says when a sequence ends; the engine only runs the Llama.

One loop iteration: take what was submitted; drop what was cancelled; admit waiting dialog turns (their
input rows from the model, prompt prefilled into the dialog pool); else, when no turn streams, admit
waiting reports, most urgent study first (``priority`` rank, then arrival), up to the free report slots and
a prompt-token budget (the model embeds the whole group, then one prefill); then one decode step over all
live sequences.
While a dialog turn streams, only ``reports_beside_dialog`` report rows decode beside it and no report
prefill runs, so the turn's tokens come at close to the single-stream pace.

Greedy decoding, per sequence (a dialog turn may ask for sampling instead: its own seeded generator, so
its draws do not depend on its batch companions): no ending (EOS, stop sequence) before ``min_new_tokens``; a sequence
ends at EOS (not returned), after one of the model's stop sequences (kept), at its ``max_new_tokens`` or
when its slot is full. Results are those of the same prompt run alone (:mod:`workers.engine.decoder`); the
vision towers process each image by itself, so nothing about a study depends on the others in its batch.

Callers submit from any thread and wait on a :class:`Handle`; ``on_token`` callbacks run in the engine
thread and must be quick (a Redis publish is). An error in one request's callback fails that request only;
an error in a shared step fails the requests of that step, and the engine goes on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radialog.logging import get_logger
from workers.engine.decoder import Group, LlamaSteps
from workers.engine.kv_pool import KVPool
from workers.engine.model import EngineModel, Streamer
from workers.models.base import RequestCancelled

if TYPE_CHECKING:
    from workers.models.base import ClassifierFinding, ModelBackend, Sampling

log = get_logger(__name__)

REPORT, DIALOG = "report", "dialog"


@dataclass
class EngineConfig:
    """Sizes of the engine. ``report_slots`` is also the largest report batch decoded at once."""

    report_slots: int = 64
    dialog_slots: int = 4
    #: Tokens per report slot; None = the longest report prompt + the report token limit.
    report_max_len: int | None = None
    dialog_max_len: int = 4096
    #: Most prompt tokens prefilled for reports in one iteration: bounds how long a dialog turn that arrives
    #: meanwhile waits for its first token (~2,048 x 13.5 GFLOP = ~28 TFLOP, tens of ms on an H100).
    prefill_tokens: int = 2048
    #: Report rows decoded beside a streaming dialog turn (the others pause, keeping their cache).
    reports_beside_dialog: int = 16
    #: Share of the free accelerator memory the pools may take (CUDA only; CPU uses the sizes as given).
    memory_fraction: float = 0.9


@dataclass
class Generation:
    """What a request produced: new tokens (EOS excluded), why it stopped, and timings in seconds."""

    tokens: list[int]
    finish: str  # "eos", "stop" (a stop sequence, kept in tokens), "length" (token limit or slot full)
    timings: dict[str, float]
    findings: list[ClassifierFinding] | None = None  # reports: the classifier's labels
    phrase: str | None = None  # reports: the findings phrase given to the LLM


class Handle:
    """A submitted request: wait with :meth:`result`, stop it with :meth:`cancel`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._future: Future[Generation] = Future()
        self._cancel = threading.Event()

    def result(self, timeout: float | None = None) -> Generation:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, callback: Callable[[Handle], None]) -> None:
        """Call ``callback(handle)`` when the request ends (in the engine thread, or at once if it has)."""
        self._future.add_done_callback(lambda _future: callback(self))

    def cancel(self) -> None:
        """Ask the engine to drop the request at its next step (its slot is freed, others go on)."""
        self._cancel.set()
        self._engine.wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


@dataclass
class _Request:
    kind: str
    handle: Handle
    inputs: Any  # what the model's embed_reports / embed_dialogs need (prepared in the caller's thread)
    max_new_tokens: int
    min_new_tokens: int = 0
    on_token: Callable[[str], None] | None = None
    sampling: Sampling | None = None  # None: greedy
    submitted: float = field(default_factory=time.perf_counter)
    priority: int = 1  # reports: the study's rank (0 HIGH first); dialog turns are always admitted first


@dataclass
class _Sequence:
    request: _Request
    pool: KVPool
    slot: int
    length: int  # tokens in the cache
    tokens: list[int]
    timings: dict[str, float]
    streamer: Streamer | None = None
    findings: list[ClassifierFinding] | None = None
    phrase: str | None = None
    generator: torch.Generator | None = None  # sampling requests: their own random stream


class Engine:
    """Owns the model's GPU work in one thread; submit from anywhere."""

    def __init__(self, backend: ModelBackend | EngineModel, config: EngineConfig | None = None) -> None:
        self.backend = backend
        self.model = served_model(backend)
        self.config = config or EngineConfig()
        self.steps = LlamaSteps(self.model.language_model)
        self.eos = self.model.eos_id
        self.stops = tuple(tuple(s) for s in self.model.stop_sequences if s)
        #: Model positions of the longest report prompt: sizes the report slots and the prefill budget.
        self.longest_report = self.longest_report_prompt()
        self.pools = self._make_pools()
        self.live: dict[str, list[_Sequence]] = {REPORT: [], DIALOG: []}
        self.waiting: dict[str, deque[_Request]] = {REPORT: deque(), DIALOG: deque()}
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.step_count = 0

    # -- sizing -------------------------------------------------------------------------------------
    def longest_report_prompt(self) -> int:
        """Model positions of the longest report prompt (RaDialog: every CheXpert label predicted)."""
        return self.model.longest_report_positions()

    def _make_pools(self) -> dict[str, KVPool]:
        cfg = self.config
        report_len = cfg.report_max_len or self.longest_report + self.model.report_token_limit() + 1
        dialog_len = cfg.dialog_max_len
        if self.model.max_positions is not None:  # never more positions than the model was trained for
            report_len = min(report_len, self.model.max_positions)
            dialog_len = min(dialog_len, self.model.max_positions)
        device, dtype, shape = self.steps.device, self.steps.dtype, self.steps.shape
        per_token = shape.bytes_per_token(dtype)
        report_slots = cfg.report_slots
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            budget = int(free * cfg.memory_fraction) - cfg.dialog_slots * dialog_len * per_token
            fits = max(1, budget // (report_len * per_token))
            if fits < report_slots:
                log.warning("KV memory limits the report batch", extra={"asked": report_slots, "fits": int(fits)})
                report_slots = int(fits)
        pools = {
            REPORT: KVPool(REPORT, shape, report_slots, report_len, dtype, device),
            DIALOG: KVPool(DIALOG, shape, cfg.dialog_slots, dialog_len, dtype, device),
        }
        log.info(
            "engine pools",
            extra={
                name: {"slots": p.slots, "max_len": p.max_len, "GiB": round(p.nbytes / 2**30, 2)}
                for name, p in pools.items()
            },
        )
        return pools

    # -- life ---------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="radialog-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; what is unfinished is cancelled."""
        self._stopping = True
        self._inbox.put(None)
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    @property
    def busy(self) -> int:
        """Requests waiting or running."""
        return sum(len(q) for q in self.waiting.values()) + sum(len(s) for s in self.live.values())

    # -- submit (any thread) ------------------------------------------------------------------------
    def submit_reports(
        self,
        images: Sequence[np.ndarray],
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        priorities: Sequence[int] | None = None,
    ) -> list[Handle]:
        """Queue report requests (greedy); the images are prepared in the caller's thread. ``priorities``:
        each study's rank (0 HIGH, 1 ROUTINE, 2 LOW), admitted in that order, then by arrival."""
        limit = max_new_tokens or self.model.report_token_limit()
        room = self.pools[REPORT].max_len - self.longest_report - 1
        if limit > room:  # else a long report would end "length" where the simple path goes on
            raise ValueError(
                f"{limit} new tokens do not fit the report slots ({room} after the longest prompt); "
                "build the engine with a larger report_max_len"
            )
        handles = []
        ranks = list(priorities) if priorities is not None else [1] * len(images)
        for inputs, rank in zip(self.model.prepare_reports(images), ranks, strict=True):
            handle = Handle(self)
            self._put(_Request(REPORT, handle, inputs, limit, min_new_tokens, priority=rank))
            handles.append(handle)
        return handles

    def submit_dialog(
        self,
        prompt: str,
        image: np.ndarray,
        max_new_tokens: int,
        on_token: Callable[[str], None] | None = None,
        min_new_tokens: int = 0,
        sampling: Sampling | None = None,
    ) -> Handle:
        """Queue a dialog turn (the whole prompt, its image placeholder included); served before reports."""
        inputs, positions = self.model.prepare_dialog(prompt, image)
        if positions + 1 > self.pools[DIALOG].max_len:
            raise ValueError(
                f"the prompt takes {positions} positions; the dialog slots hold {self.pools[DIALOG].max_len}"
            )
        handle = Handle(self)
        self._put(
            _Request(DIALOG, handle, inputs, max_new_tokens, min_new_tokens, on_token=on_token, sampling=sampling)
        )
        return handle

    def _put(self, request: _Request) -> None:
        if self._stopping:
            raise RuntimeError("the engine is stopping")
        self._inbox.put(request)
        self.wake()

    # -- the loop (engine thread) -------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._take_inbox():
                    break
                try:
                    self._iteration()
                except Exception:  # never let the loop die: the step's requests were failed already
                    log.exception("engine iteration failed")
        self._cancel_everything()

    def _take_inbox(self) -> bool:
        """Move submitted requests to the waiting queues; sleep while there is nothing to do."""
        if not self.busy:
            self._wake.wait(timeout=1.0)
        self._wake.clear()
        reports = len(self.waiting[REPORT])
        try:
            while True:
                try:
                    request = self._inbox.get_nowait()
                except queue.Empty:
                    return not self._stopping
                if request is None:
                    return False
                self.waiting[request.kind].append(request)
        finally:
            if len(self.waiting[REPORT]) != reports:  # urgent studies first; arrival order within a rank
                self.waiting[REPORT] = deque(sorted(self.waiting[REPORT], key=lambda r: r.priority))

    def _iteration(self) -> None:
        self._drop_cancelled()
        if self.waiting[DIALOG] and self.pools[DIALOG].free:
            self._admit_dialogs()
        elif self.waiting[REPORT] and self.pools[REPORT].free and not self.live[DIALOG]:
            self._admit_reports()
        if self.live[DIALOG] or self.live[REPORT]:
            self._decode_step()

    def _drop_cancelled(self) -> None:
        for kind, waiting in self.waiting.items():
            kept = deque(r for r in waiting if not r.handle.cancelled)
            for request in waiting:
                if request.handle.cancelled:
                    request.handle._future.set_exception(RequestCancelled("cancelled before it started"))
            self.waiting[kind] = kept
        for kind in (DIALOG, REPORT):
            gone = [s for s in self.live[kind] if s.request.handle.cancelled]
            for seq in sorted(gone, key=lambda s: -s.slot):
                self._end(seq, error=RequestCancelled("cancelled while generating"))

    # -- admission ----------------------------------------------------------------------------------
    def _admit_dialogs(self) -> None:
        pool = self.pools[DIALOG]
        count = min(pool.free, len(self.waiting[DIALOG]))
        self._admit_dialog_group([self.waiting[DIALOG].popleft() for _ in range(count)])

    def _admit_dialog_group(self, requests: list[_Request]) -> None:
        """The model's input rows for the turns (their images through its vision tower), then their prefill;
        a failing group goes one by one."""
        started = time.perf_counter()
        try:
            rows = self.model.embed_dialogs([r.inputs for r in requests])
        except Exception as exc:  # noqa: BLE001 - the requests get the error; the engine thread goes on
            self._one_by_one(requests, exc, self._admit_dialog_group, "dialog admission")
            return
        vision_s = time.perf_counter() - started
        none = [None] * len(requests)
        self._prefill(self.pools[DIALOG], requests, rows, [{"vision": vision_s}] * len(requests), none, none)

    @staticmethod
    def _one_by_one(
        requests: list[_Request], exc: Exception, retry: Callable[[list[_Request]], None], what: str
    ) -> None:
        """A group step failed: a single request gets the error, a group is retried request by request."""
        if len(requests) == 1:
            requests[0].handle._future.set_exception(exc)
            return
        log.warning(f"{what} failed; one by one", extra={"rows": len(requests), "error": type(exc).__name__})
        for request in requests:
            retry([request])

    def _admit_reports(self) -> None:
        pool = self.pools[REPORT]
        per_prompt = self.longest_report
        count = max(1, min(pool.free, len(self.waiting[REPORT]), self.config.prefill_tokens // per_prompt))
        self._admit_report_group([self.waiting[REPORT].popleft() for _ in range(count)])

    def _admit_report_group(self, requests: list[_Request]) -> None:
        """The model's input rows for the group (RaDialog: classifier, then vision tower), then its prefill;
        a failing group is admitted one by one so that the fault stays with its study."""
        try:
            embedded = self.model.embed_reports([r.inputs for r in requests])
        except Exception as exc:  # noqa: BLE001 - the requests get the error; the engine thread goes on
            self._one_by_one(requests, exc, self._admit_report_group, "report admission")
            return
        timings = [{**embedded.timings, "admitted_together": float(len(requests))}] * len(requests)
        self._prefill(self.pools[REPORT], requests, embedded.rows, timings, embedded.findings, embedded.phrases)

    def _prefill(
        self,
        pool: KVPool,
        requests: list[_Request],
        rows: list[torch.Tensor],
        timings: list[dict[str, float]],
        findings: Sequence[Any],
        phrases: Sequence[Any],
    ) -> None:
        """Prefill ``rows`` into new slots; a group that fails is retried one by one (the fault stays with its
        request)."""
        started = time.perf_counter()
        try:
            slots = pool.take(len(requests))
        except RuntimeError as exc:  # admission takes no more than the free slots; never leave a caller waiting
            for request in requests:
                request.handle._future.set_exception(exc)
            return
        try:
            logits = self.steps.prefill(rows, pool, slots)
        except Exception as exc:  # noqa: BLE001 - the requests get the error; the engine thread goes on
            pool.used -= len(requests)  # the slots just taken are the last ones: nothing to move
            if len(requests) == 1:
                requests[0].handle._future.set_exception(exc)
                return
            log.warning("prefill failed; one by one", extra={"rows": len(requests), "error": type(exc).__name__})
            for i in range(len(requests)):
                self._prefill(
                    pool,
                    requests[i : i + 1],
                    rows[i : i + 1],
                    timings[i : i + 1],
                    findings[i : i + 1],
                    phrases[i : i + 1],
                )
            return
        prefill_s = time.perf_counter() - started
        now = time.perf_counter()
        fresh = []
        for i, request in enumerate(requests):
            streamer = self.model.streamer(request.on_token) if request.on_token else None
            seq = _Sequence(
                request,
                pool,
                slots[i],
                len(rows[i]),
                [],
                {
                    **timings[i],
                    "queued": started - request.submitted,
                    "prefill": prefill_s,
                    "decode_started": now,
                },
                streamer,
                findings[i],
                phrases[i],
                _generator(request.sampling, logits.device),
            )
            self.live[request.kind].append(seq)
            fresh.append(seq)
        self._advance(fresh, logits)

    # -- decode -------------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        dialogs = self.live[DIALOG]
        reports = self.live[REPORT]
        if dialogs:
            reports = reports[: self.config.reports_beside_dialog]
        groups, rows = [], []
        for seqs in (dialogs, reports):
            if not seqs:
                continue
            device = self.steps.device
            groups.append(
                Group(
                    seqs[0].pool,
                    torch.arange(len(seqs), device=device),
                    torch.tensor([s.length for s in seqs], device=device),
                )
            )
            rows.extend(seqs)
        tokens = torch.tensor([s.tokens[-1] for s in rows], device=self.steps.device)
        try:
            logits = self.steps.decode(tokens, groups)
        except Exception as exc:  # noqa: BLE001 - the rows' requests get the error; the engine goes on
            log.warning("decode step failed", extra={"rows": len(rows), "error": type(exc).__name__})
            for seq in sorted(rows, key=lambda s: (s.request.kind, -s.slot)):
                self._end(seq, error=exc)
            return
        self.step_count += 1
        for seq in rows:
            seq.length += 1
        self._advance(rows, logits)

    def _advance(self, rows: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick each row's next token (greedy unless the request samples; EOS held back until
        min_new_tokens) and end what is finished."""
        eos_blocked = [i for i, s in enumerate(rows) if len(s.tokens) < s.request.min_new_tokens]
        if eos_blocked:
            logits[eos_blocked, self.eos] = float("-inf")
        picked = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(rows):
            if seq.request.sampling is not None and seq.generator is not None:
                picked[i] = sample(logits[i], seq.request.sampling, seq.generator)
        finished: list[tuple[_Sequence, str, BaseException | None]] = []
        now = time.perf_counter()
        for seq, token in zip(rows, picked):
            if not seq.tokens:
                seq.timings["first_token"] = now - seq.request.submitted
            if token == self.eos:
                finished.append((seq, "eos", None))
                continue
            seq.tokens.append(token)
            if seq.streamer is not None:
                try:
                    seq.streamer.put(torch.tensor([token]))
                except Exception as exc:  # noqa: BLE001 - the caller's callback failed: that request alone ends
                    finished.append((seq, "error", exc))
                    continue
            if self.stops and len(seq.tokens) >= seq.request.min_new_tokens and _ends_with_stop(seq.tokens, self.stops):
                finished.append((seq, "stop", None))
            elif len(seq.tokens) >= seq.request.max_new_tokens or seq.length >= seq.pool.max_len:
                finished.append((seq, "length", None))
        for seq, reason, error in sorted(finished, key=lambda f: (f[0].request.kind, -f[0].slot)):
            self._end(seq, finish=reason, error=error)

    def _end(self, seq: _Sequence, *, finish: str = "", error: BaseException | None = None) -> None:
        """Free the sequence's slot (the pool's last sequence moves into it) and settle its handle.

        Callers end several sequences of one pool in descending slot order.
        """
        live = self.live[seq.request.kind]
        last = live[-1]
        moved = seq.pool.release(seq.slot, last.length)
        index = live.index(seq)
        if moved is not None:
            live[index] = last
            last.slot = seq.slot
            live.pop()
        else:
            live.pop(index)
        future = seq.request.handle._future
        if error is not None:
            future.set_exception(error)
            return
        if seq.streamer is not None:
            try:
                seq.streamer.end()
            except Exception as exc:  # noqa: BLE001 - the waiting caller gets the error, not the engine thread
                future.set_exception(exc)
                return
        timings = dict(seq.timings)
        timings["decode"] = time.perf_counter() - timings.pop("decode_started")
        timings["total"] = time.perf_counter() - seq.request.submitted
        future.set_result(Generation(seq.tokens, finish, timings, seq.findings, seq.phrase))

    def _cancel_everything(self) -> None:
        for waiting in self.waiting.values():
            while waiting:
                waiting.popleft().handle._future.set_exception(RequestCancelled("the engine stopped"))
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.handle._future.set_exception(RequestCancelled("the engine stopped"))
        for kind in (DIALOG, REPORT):
            for seq in sorted(self.live[kind], key=lambda s: -s.slot):
                self._end(seq, error=RequestCancelled("the engine stopped"))


def served_model(backend: ModelBackend | EngineModel) -> EngineModel:
    """The engine's view of ``backend`` (its ``engine_model()``), or ``backend`` itself when it is one."""
    if isinstance(backend, EngineModel):
        return backend
    model = backend.engine_model()
    if model is None:
        raise TypeError(f"{type(backend).__name__} cannot be served by the engine")
    return model


def _ends_with_stop(tokens: list[int], stops: tuple[tuple[int, ...], ...]) -> bool:
    return any(len(tokens) >= len(stop) and tuple(tokens[-len(stop) :]) == stop for stop in stops)


def _generator(sampling: Sampling | None, device: torch.device) -> torch.Generator | None:
    """A request's own random stream (seeded when asked), on the device its logits are on."""
    if sampling is None:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from ``logits`` [vocab] with temperature, top-k and nucleus (top-p) filtering, in the order
    and manner of transformers' warpers (top-p keeps the smallest set of tokens whose probability reaches
    ``top_p``, at least one)."""
    scores = logits.float() / max(sampling.temperature, 1e-5)
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - sampling.top_p)
        drop[-1] = False
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probabilities = scores.softmax(dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator).item())
