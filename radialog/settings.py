"""One settings object for every process, read from ``RADIALOG_*`` environment variables.

A settings file can be named with ``RADIALOG_CONFIG`` (TOML or .env style, see README); environment
variables win over the file. Nested values (lists, destinations) are given as JSON in the environment,
e.g. ``RADIALOG_DESTINATIONS='[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}]'``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from radialog.routing import RoutingRule, default_rules, validate_rules


class TLSSettings(BaseModel):
    """DICOM TLS for the SCP (server side) or for one export destination (client side)."""

    certfile: Path
    keyfile: Path
    ca_file: Path | None = None
    require_client_cert: bool = False


#: Webhook events a destination of kind "webhook" may subscribe to.
WEBHOOK_EVENTS = ("study.reported", "study.failed", "report.approved", "export.dead")
#: Destination kinds that take the SR itself (a PACS by C-STORE, a DICOMweb store by STOW-RS); the others
#: take text (HL7, FHIR) or events (webhook) through the same outbox.
SR_KINDS = ("dimse", "stow")


class Destination(BaseModel):
    """An output channel: a PACS (C-STORE SCP), a DICOMweb endpoint (STOW-RS), a RIS (HL7 v2 ORU^R01 over
    MLLP), a FHIR R4 server, or a webhook receiver. Every kind is driven by the same outbox."""

    name: str
    kind: Literal["dimse", "stow", "hl7", "fhir", "webhook"] = "dimse"
    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = 4242  # DICOM port (dimse) or MLLP port (hl7)
    url: str | None = None  # STOW-RS base URL (stow), FHIR base URL (fhir), receiver URL (webhook)
    tls: TLSSettings | None = None
    receiving_application: str = "RIS"  # hl7: MSH-5
    receiving_facility: str = ""  # hl7: MSH-6
    secret: str | None = Field(None, repr=False)  # webhook: HMAC-SHA256 key; fhir: bearer token
    events: list[str] = Field(default_factory=lambda: list(WEBHOOK_EVENTS))  # webhook: subscribed events

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.kind in ("stow", "fhir", "webhook") and not self.url:
            raise ValueError(f"destination {self.name!r} ({self.kind}) needs a url")
        if self.kind == "webhook":
            if not self.secret or len(self.secret) < 16:
                raise ValueError(f"webhook destination {self.name!r} needs a secret of at least 16 characters")
            unknown = sorted(set(self.events) - set(WEBHOOK_EVENTS))
            if unknown:
                raise ValueError(
                    f"webhook destination {self.name!r}: unknown events {unknown}; known: {list(WEBHOOK_EVENTS)}"
                )
        return self

    @property
    def carries_sr(self) -> bool:
        """Whether this destination takes the SR (``SR_KINDS``): the outbox sends it the file, the operations
        page counts its deliveries as "image -> PACS"."""
        return self.kind in SR_KINDS


class Settings(BaseSettings):
    """Everything configurable, with defaults that run on one machine (`radialog run`)."""

    model_config = SettingsConfigDict(env_prefix="RADIALOG_", extra="ignore")

    # -- storage -------------------------------------------------------------------------------
    data_dir: Path = Field(Path("./var"), description="Spool, SQLite registry, SR files, logs.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/registry.sqlite (WAL)."
    )
    min_free_bytes: int = Field(2 * 1024**3, description="Below this free space in the spool, C-STORE answers 0xA700.")

    # -- DICOM node ------------------------------------------------------------------------------
    ae_title: str = "RADIALOG"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    allowed_calling_aets: list[str] = Field(default_factory=list, description="Empty list = any calling AE title.")
    allowed_addresses: list[str] = Field(
        default_factory=list, description="IP addresses or CIDR networks; empty = any."
    )
    max_associations: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pending_connections: int = Field(
        100,
        ge=1,
        description="Connections that have not yet sent their A-ASSOCIATE-RQ (they hold no association "
        "slot); at this many the oldest is closed.",
    )
    pdu_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a PDU may take from its first to its last byte; a partial PDU closes the "
        "connection (so a sender needs max_pdu_bytes / pdu_timeout, 35 KB/s with the defaults).",
    )
    max_pdu_bytes: int = Field(
        1024 * 1024,
        ge=4096,
        le=2**31,
        description="Largest PDU received (our Maximum Length); a peer declaring a "
        "longer one is aborted before anything is read.",
    )
    max_instance_bytes: int = Field(
        128 * 1024**2,
        ge=1024,
        description="Largest dataset one C-STORE may carry; beyond it the data are dropped as "
        "they arrive and the answer is 0xA700 (out of resources).",
    )
    tls: TLSSettings | None = None
    stable_after: float = Field(3.0, description="Seconds without a new instance before a study is STABLE.")
    trusted_routers: list[str] = Field(
        default_factory=list,
        description="Calling AE titles that send whole studies in one association (the "
        "Orthanc router plugin): their studies are complete when the association is released, without waiting "
        "stable_after. Empty = none.",
    )
    routing_rules: list[RoutingRule] = Field(
        default_factory=default_rules,
        description="Which studies get a pre-read and at what priority; first "
        "match decides (README: routing rules). Default: under 18 skipped, C-STORE HIGH or STAT order HIGH, "
        "the rest ROUTINE.",
    )

    # -- queue / workers -------------------------------------------------------------------------
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None  # default: same as broker_url
    visibility_timeout: int = Field(3600, description="Seconds; must exceed the longest job.")
    batch_size: int = Field(8, description="Most report jobs one worker runs as one batch.")
    batch_wait_ms: int = Field(200, description="How long a worker waits to fill a batch.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    engine: bool = Field(
        True,
        description="Serve the model through the batching engine (reports join a running batch, dialog "
        "turns first); false = one batch at a time through transformers' generate.",
    )
    report_tasks: int = Field(
        2,
        ge=1,
        description="Report batches a worker feeds its engine at once (Celery threads; 1 without the engine).",
    )
    engine_report_slots: int = Field(
        64,
        ge=1,
        description="Most reports decoded together (fewer if the GPU memory left after the model is short).",
    )
    engine_dialog_slots: int = Field(4, ge=1, description="Dialog turns served at once (4,096-token slots).")
    engine_reports_beside_dialog: int = Field(
        16,
        ge=0,
        description="Report rows decoded while a dialog turn streams (the rest pause).",
    )

    # -- model -----------------------------------------------------------------------------------
    model_backend: str = "radialog-v2"
    model_dir: Path | None = Field(
        None, description="The RaDialog v2 directory (adapter, non_lora_trainables, classifier)."
    )
    base_model_dir: Path | None = Field(None, description="The llava-v1.5-7b directory.")
    xraygpt_vision_dir: Path | None = Field(
        None,
        description="XrayGPT: the directory holding eva_vit_g.pth and blip2_pretrained_flant5xxl.pth (LAVIS).",
    )
    xraygpt_llm_dir: Path | None = Field(
        None,
        description="XrayGPT: the radiology-tuned Vicuna-7B directory (Vicuna_Radiology_fp16).",
    )
    xraygpt_checkpoint: Path | None = Field(None, description="XrayGPT: its checkpoint file (llama_proj).")
    v1_dir: Path | None = Field(
        None,
        description="RaDialog v1: its release files unpacked in the reference repository's layout "
        "(checkpoint_4.pth, checkpoints/vicuna-7b-img-*, the findings classifier).",
    )
    v1_adapter: str = Field(
        "checkpoints/vicuna-7b-img-instruct/checkpoint-4800",
        description="RaDialog v1: the LoRA adapter directory, relative to RADIALOG_V1_DIR or absolute (default "
        "RaDialog-INS; checkpoints/vicuna-7b-img-report/checkpoint-11200 is RaDialog-RG, reports only).",
    )
    v1_llm_dir: Path | None = Field(None, description="RaDialog v1: the lmsys/vicuna-7b-v1.3 directory.")
    v1_biovil_file: Path | None = Field(
        None,
        description="RaDialog v1: BioViL-T's image model file (biovil_t_image_model_proj_size_128.pt).",
    )

    # -- export ----------------------------------------------------------------------------------
    destinations: list[Destination] = Field(default_factory=list)
    export_max_attempts: int = 40
    export_backoff_initial: float = 5.0
    export_backoff_max: float = 600.0

    # -- API -------------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    institution_name: str = "radialog-node"
    cors_origins: list[str] = Field(default_factory=list, description="Empty = CORS off.")
    api_request_timeout: float = Field(
        15.0,
        gt=0,
        description="Seconds a client has to send a whole request (head and body); a half-sent "
        "or silent connection is then closed (408).",
    )
    api_max_connections: int = Field(
        1000,
        ge=16,
        description="Most open HTTP connections (lowered to fit the file-descriptor limit); a new "
        "one beyond it closes the oldest idle or half-sent one.",
    )
    api_max_body_bytes: int = Field(
        1024**2,
        ge=1024,
        description="Largest request body; a larger one is refused (413) before it is read.",
    )

    @field_validator("routing_rules")
    @classmethod
    def _rules(cls, value: list[RoutingRule]) -> list[RoutingRule]:
        return validate_rules(value)

    @field_validator("destinations")
    @classmethod
    def _destination_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique (the outbox keys rows by name)")
        return value

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not value or len(value) > 16 or "\\" in value:
            raise ValueError("an AE title is 1-16 characters without backslash")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("RADIALOG_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    # -- derived paths ---------------------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def sr_dir(self) -> Path:
        return self.data_dir / "sr"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'registry.sqlite').resolve()}"

    @property
    def resolved_result_backend(self) -> str:
        return self.result_backend or self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own ``Settings(...)`` instead."""
    return Settings()
