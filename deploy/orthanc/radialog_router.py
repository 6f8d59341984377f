"""Orthanc routing for radialog-node: forward each new CR/DX chest study to the node, once, with retries.

Runs inside Orthanc's Python plugin (Debian package ``orthanc-python``; the ``orthancteam/orthanc`` images
ship it too) on the system Python, standard library only. Why a Python plugin and not Lua: Orthanc 1.10's
Lua engine has no timer (``OnHeartBeat`` came later) and a failed forward is never retried by Orthanc, so
a periodic re-check of pending forwards needs a thread.

What it does
  * STABLE_STUDY: collect the study's image instances of the configured modalities (CR, DX by default:
    never our SRs, never CT), leave out those already forwarded, and send the rest to the node with one
    asynchronous Orthanc store job.
  * JOB_SUCCESS: mark those instances forwarded (instance metadata ``RadialogForwarded``), so a study that
    becomes stable again (our SR arriving makes it unstable) is not sent twice.
  * JOB_FAILURE (node down, refused): retry the job later, with backoff up to ``MaxRetryInterval``, forever.
  * Orthanc restart: the state lives in study metadata ``RadialogRouting`` (JSON), so pending forwards are
    found again by a scan of the studies at start.

Configuration (Orthanc JSON), all optional except the modality:
  "UserMetadata": {"RadialogRouting": 4801, "RadialogForwarded": 4802},
  "RadialogRouter": {"Modality": "radialog", "Modalities": ["CR", "DX"], "RetryInterval": 10,
                     "MaxRetryInterval": 600, "CheckInterval": 2}
No patient data is logged: only Orthanc resource ids (hashes) and counts.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, field

import orthanc  # provided by the Orthanc Python plugin

ROUTING_KEY = "RadialogRouting"  # study metadata: the routing state (JSON)
FORWARDED_KEY = "RadialogForwarded"  # instance metadata: when the node accepted this instance


@dataclass
class RouterConfig:
    """The "RadialogRouter" section of the Orthanc configuration."""

    modality: str = "radialog"
    modalities: tuple[str, ...] = ("CR", "DX")
    retry_interval: float = 10.0
    max_retry_interval: float = 600.0
    check_interval: float = 2.0

    @classmethod
    def from_orthanc(cls) -> RouterConfig:
        section = json.loads(orthanc.GetConfiguration()).get("RadialogRouter", {})
        return cls(
            modality=section.get("Modality", cls.modality),
            modalities=tuple(m.upper() for m in section.get("Modalities", cls.modalities)),
            retry_interval=float(section.get("RetryInterval", cls.retry_interval)),
            max_retry_interval=float(section.get("MaxRetryInterval", cls.max_retry_interval)),
            check_interval=float(section.get("CheckInterval", cls.check_interval)),
        )


@dataclass
class Routing:
    """One study's routing state, kept in its ``RadialogRouting`` metadata.

    state: "idle" (nothing pending; ``forwarded`` instances sent so far), "sending" (job running) or
    "retrying" (job failed, next try at ``next_try``). ``stable_events`` counts the STABLE_STUDY changes
    handled, which lets tests and operators see that a later STABLE was looked at and left alone.
    """

    state: str = "idle"
    job: str | None = None
    instances: list[str] = field(default_factory=list)
    attempts: int = 0
    next_try: float = 0.0
    forwarded: int = 0
    stable_events: int = 0
    last_error: str | None = None


def _get_json(uri: str) -> object:
    return json.loads(orthanc.RestApiGet(uri))


def _load_routing(study: str) -> Routing | None:
    try:
        raw = orthanc.RestApiGet(f"/studies/{study}/metadata/{ROUTING_KEY}")
    except orthanc.OrthancException:
        return None  # no metadata yet (404), or the study is gone
    known = Routing.__dataclass_fields__
    return Routing(**{k: v for k, v in json.loads(raw).items() if k in known})


def _save_routing(study: str, routing: Routing) -> None:
    orthanc.RestApiPut(f"/studies/{study}/metadata/{ROUTING_KEY}", json.dumps(asdict(routing)))


def _is_forwarded(instance: str) -> bool:
    try:
        orthanc.RestApiGet(f"/instances/{instance}/metadata/{FORWARDED_KEY}")
        return True
    except orthanc.OrthancException:
        return False


class Router:
    """Serialises every routing decision on one thread: change events in, store jobs out."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.events: queue.Queue[tuple[str, str]] = queue.Queue()
        self.job_study: dict[str, str] = {}  # store job id -> Orthanc study id
        self.retrying: set[str] = set()  # studies whose job failed and waits for its next try
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="radialog-router", daemon=True)

    # -- events (called from Orthanc's change thread: only enqueue) -----------------------------
    def on_change(self, change_type: int, level: int, resource: str) -> None:
        if change_type == orthanc.ChangeType.STABLE_STUDY:
            self.events.put(("stable", resource))
        elif change_type == orthanc.ChangeType.JOB_SUCCESS:
            self.events.put(("job_success", resource))
        elif change_type == orthanc.ChangeType.JOB_FAILURE:
            self.events.put(("job_failure", resource))
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            self.events.put(("started", ""))
            if not self.thread.is_alive():
                self.thread.start()
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            self.stopping.set()
            self.events.put(("stop", ""))
            if self.thread.is_alive():
                self.thread.join(timeout=5)

    def _run(self) -> None:
        handlers = {
            "stable": self.on_stable,
            "job_success": self.on_job_success,
            "job_failure": self.on_job_failure,
            "started": lambda _: self.resume_pending(),
        }
        while not self.stopping.is_set():
            try:
                kind, resource = self.events.get(timeout=self.config.check_interval)
            except queue.Empty:
                kind, resource = "", ""
            try:
                if kind in handlers:
                    handlers[kind](resource)
                self.retry_due()
            except Exception as exc:  # noqa: BLE001 - a bad event must not stop routing for every other study
                if not self.stopping.is_set():
                    orthanc.LogError(f"radialog-router: {kind} {resource}: {type(exc).__name__}: {exc}")

    # -- decisions ------------------------------------------------------------------------------
    def images_to_forward(self, study: str) -> list[str]:
        """The study's instances of the routed modalities that the node has not accepted yet."""
        wanted: list[str] = []
        for series in _get_json(f"/studies/{study}/series"):
            modality = series.get("MainDicomTags", {}).get("Modality", "").upper()
            if modality in self.config.modalities:
                wanted.extend(i for i in series.get("Instances", []) if not _is_forwarded(i))
        return sorted(wanted)

    def on_stable(self, study: str) -> None:
        routing = _load_routing(study) or Routing()
        routing.stable_events += 1
        if routing.state == "idle":
            self._send(study, routing)  # saves the state
        else:
            _save_routing(study, routing)  # a job is out; its success re-checks the study

    def _send(self, study: str, routing: Routing) -> None:
        instances = self.images_to_forward(study)
        if not instances:
            routing.state, routing.job, routing.instances = "idle", None, []
            _save_routing(study, routing)
            orthanc.LogInfo(f"radialog-router: study {study}: nothing (new) to forward")
            return
        body = {"Resources": instances, "Asynchronous": True, "Permissive": False}
        job = json.loads(orthanc.RestApiPost(f"/modalities/{self.config.modality}/store", json.dumps(body)))["ID"]
        routing.state, routing.job, routing.instances = "sending", job, instances
        routing.attempts += 1
        _save_routing(study, routing)
        self.job_study[job] = study
        self.retrying.discard(study)
        orthanc.LogInfo(f"radialog-router: study {study}: {len(instances)} instance(s) -> job {job}")

    def on_job_success(self, job: str) -> None:
        study = self.job_study.pop(job, None)
        if study is None:
            return  # not one of ours
        routing = _load_routing(study)
        if routing is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for instance in routing.instances:
            orthanc.RestApiPut(f"/instances/{instance}/metadata/{FORWARDED_KEY}", stamp)
        routing.forwarded += len(routing.instances)
        routing.state, routing.job, routing.instances = "idle", None, []
        routing.attempts, routing.last_error = 0, None
        orthanc.LogInfo(f"radialog-router: study {study}: forwarded, {routing.forwarded} instance(s) in all")
        self._send(study, routing)  # images that arrived while the job ran; else just saves "idle"

    def on_job_failure(self, job: str) -> None:
        study = self.job_study.get(job)
        if study is None:
            return
        routing = _load_routing(study)
        if routing is None:
            return
        try:
            routing.last_error = str(_get_json(f"/jobs/{job}").get("ErrorDescription", ""))[:200]
        except orthanc.OrthancException:
            routing.last_error = "job gone"
        delay = min(self.config.retry_interval * 2 ** max(routing.attempts - 1, 0), self.config.max_retry_interval)
        routing.state, routing.next_try = "retrying", time.time() + delay
        _save_routing(study, routing)
        self.retrying.add(study)
        orthanc.LogWarning(
            f"radialog-router: study {study}: forward failed (attempt {routing.attempts}: "
            f"{routing.last_error}); next try in {delay:.0f} s"
        )

    def retry_due(self) -> None:
        """Resubmit the failed jobs whose backoff has passed (a fresh job when Orthanc forgot the old one)."""
        now = time.time()
        for study in sorted(self.retrying):
            routing = _load_routing(study)
            if routing is None or routing.state != "retrying":
                self.retrying.discard(study)
                continue
            if routing.next_try > now:
                continue
            self.retrying.discard(study)
            job = routing.job
            try:
                if job is None:
                    raise orthanc.OrthancException()
                orthanc.RestApiPost(f"/jobs/{job}/resubmit", "")
            except orthanc.OrthancException:
                routing.state = "idle"  # the old job is unknown here (history trimmed, restart): new one
                self._send(study, routing)
                continue
            routing.state, routing.attempts = "sending", routing.attempts + 1
            _save_routing(study, routing)
            self.job_study[job] = study

    def resume_pending(self) -> None:
        """After a restart: find studies left "sending" or "retrying" and pick them up again."""
        for study in _get_json("/studies"):
            routing = _load_routing(study)
            if routing is None or routing.state == "idle":
                continue
            if routing.state == "sending" and routing.job:
                try:
                    state = _get_json(f"/jobs/{routing.job}").get("State")
                except orthanc.OrthancException:
                    state = None
                if state in ("Pending", "Running", "Paused", "Retry"):
                    self.job_study[routing.job] = study
                    continue
                if state == "Success":
                    self.job_study[routing.job] = study
                    self.on_job_success(routing.job)
                    continue
            routing.state, routing.next_try = "retrying", 0.0  # failed or unknown: retry now
            _save_routing(study, routing)
            self.retrying.add(study)
        orthanc.LogInfo(f"radialog-router: started, {len(self.retrying)} forward(s) to retry")


_router = Router(RouterConfig.from_orthanc())
orthanc.RegisterOnChangeCallback(_router.on_change)
