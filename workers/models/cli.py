"""`radialog model ...`: write a tiny test checkpoint, or check that real model files load completely."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

BACKEND_OPTION = click.option(
    "--backend",
    type=click.Choice(["radialog-v2", "radialog-v1", "xraygpt"]),
    default=None,
    help="Model backend (default: RADIALOG_MODEL_BACKEND, else radialog-v2).",
)


def _backend(backend: str | None) -> str:
    if backend:
        return backend
    from radialog.settings import get_settings

    return get_settings().model_backend


@click.group()
def model() -> None:
    """The report model (RaDialog v2, RaDialog v1 or XrayGPT): test checkpoints and load checks."""


@model.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True)
@BACKEND_OPTION
def make_tiny_command(directory: Path, seed: int, backend: str | None) -> None:
    """Write a tiny RANDOM checkpoint set in the backend's published layout (tests and demo only)."""
    click.echo("TINY RANDOM MODEL - NOT CLINICAL (random weights, generates nonsense)")
    if _backend(backend) == "radialog-v1":
        from workers.models.radialog_v1.tiny import make_tiny as make_tiny_v1

        for name, value in make_tiny_v1(directory, seed=seed).env().items():
            click.echo(f"{name}={value}")
        return
    if _backend(backend) == "xraygpt":
        from workers.models.xraygpt.tiny import make_tiny as make_tiny_xraygpt

        for name, value in make_tiny_xraygpt(directory, seed=seed).env().items():
            click.echo(f"{name}={value}")
        return
    from workers.models.radialog_v2.tiny import make_tiny

    model_dir, base_dir = make_tiny(directory, seed=seed)
    click.echo(f"RADIALOG_MODEL_DIR={model_dir.resolve()}")
    click.echo(f"RADIALOG_BASE_MODEL_DIR={base_dir.resolve()}")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@model.command("check")
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="RaDialog v2 directory (default: RADIALOG_MODEL_DIR).",
)
@click.option(
    "--base-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="llava-v1.5-7b directory (default: RADIALOG_BASE_MODEL_DIR).",
)
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N (default: RADIALOG_DEVICE).")
@BACKEND_OPTION
def check_command(model_dir: Path | None, base_dir: Path | None, device: str | None, backend: str | None) -> None:
    """Load every model file exactly as a worker does and print what was found; exit 1 on any problem.

    RaDialog v1 reads RADIALOG_V1_DIR, RADIALOG_V1_ADAPTER, RADIALOG_V1_LLM_DIR and RADIALOG_V1_BIOVIL_FILE;
    XrayGPT reads RADIALOG_XRAYGPT_VISION_DIR, RADIALOG_XRAYGPT_LLM_DIR and RADIALOG_XRAYGPT_CHECKPOINT.
    """
    if _backend(backend) == "radialog-v1":
        _check_radialog_v1(device)
        return
    if _backend(backend) == "xraygpt":
        _check_xraygpt(device)
        return
    import torch

    from radialog.settings import get_settings
    from workers.models.radialog_v2.checkpoint_io import ModelFileError
    from workers.models.radialog_v2.files import locate
    from workers.models.radialog_v2.loader import load_radialog

    settings = get_settings()
    model_dir = model_dir or settings.model_dir
    base_dir = base_dir or settings.base_model_dir
    device = device or settings.device
    from radialog.console import step, table

    try:
        files = locate(model_dir, base_dir)
        click.echo("files:")
        sizes = [(f"  {path}", f"{path.stat().st_size / 1e6:,.1f} MB") for path in files.all_files()]
        click.echo(table(["  file", "size"], sizes, right={1}))
        started = time.perf_counter()
        with step(f"loading as a worker does (device {device})"):
            loaded = load_radialog(model_dir, base_dir, device)
    except ModelFileError as error:
        click.echo(f"MODEL CHECK FAILED: {error}", err=True)
        sys.exit(1)
    llava = loaded.llava
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in loaded.seconds.items())
    click.echo(f"loaded in {time.perf_counter() - started:.1f} s  ({phases})")
    click.echo("parameters:")
    click.echo(f"  language model (LoRA merged)  {_count(llava.language_model):>15,}")
    click.echo(f"  vision tower (BioViL-T)       {_count(llava.vision_tower):>15,}")
    click.echo(f"  mm_projector                  {_count(llava.mm_projector):>15,}")
    click.echo(f"  findings classifier           {_count(loaded.classifier):>15,}")
    click.echo(f"device {loaded.device}, dtype {loaded.dtype} (classifier {loaded.classifier_dtype})")
    if loaded.device.type == "cuda":
        click.echo(f"GPU memory allocated {torch.cuda.memory_allocated(loaded.device) / 2**30:.2f} GiB")
    else:
        total = sum(p.numel() * p.element_size() for m in (llava, loaded.classifier) for p in m.parameters())
        click.echo(f"weights in memory {total / 2**30:.2f} GiB")
    click.echo(f"files sha256 {loaded.sha256}")
    for note in loaded.notes:
        click.echo(f"note: {note}")
    if loaded.files is not None and loaded.files.tiny:
        click.echo("TINY RANDOM MODEL - NOT CLINICAL")


def _check_xraygpt(device: str | None) -> None:
    import torch

    from radialog.console import step, table
    from radialog.settings import get_settings
    from workers.models.radialog_v2.checkpoint_io import ModelFileError
    from workers.models.xraygpt.files import locate
    from workers.models.xraygpt.loader import load_xraygpt

    settings = get_settings()
    device = device or settings.device
    try:
        files = locate(settings.xraygpt_vision_dir, settings.xraygpt_llm_dir, settings.xraygpt_checkpoint)
        click.echo("files:")
        sizes = [(f"  {path}", f"{path.stat().st_size / 1e6:,.1f} MB") for path in files.all_files()]
        click.echo(table(["  file", "size"], sizes, right={1}))
        started = time.perf_counter()
        with step(f"loading as a worker does (device {device})"):
            loaded = load_xraygpt(files.vision_dir, files.llm_dir, files.checkpoint, device)
    except ModelFileError as error:
        click.echo(f"MODEL CHECK FAILED: {error}", err=True)
        sys.exit(1)
    model = loaded.model
    assert model.llama_model is not None
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in loaded.seconds.items())
    click.echo(f"loaded in {time.perf_counter() - started:.1f} s  ({phases})")
    parts = [
        ("vision tower (EVA ViT-g)", model.visual_encoder),
        ("ln_vision + Q-Former", model.bridge),
        ("llama_proj", model.llama_proj),
        ("language model (Vicuna)", model.llama_model),
    ]
    click.echo("parameters:")
    for name, part in parts:
        size = sum(p.numel() * p.element_size() for p in part.parameters())
        click.echo(f"  {name:<29} {_count(part):>15,}  {size / 2**30:6.2f} GiB")
    click.echo(f"device {loaded.device}, dtype {loaded.dtype} (ln_vision, Q-Former, llama_proj float32)")
    if loaded.device.type == "cuda":
        click.echo(f"GPU memory allocated {torch.cuda.memory_allocated(loaded.device) / 2**30:.2f} GiB")
    click.echo(f"files sha256 {loaded.sha256}")
    for note in loaded.notes:
        click.echo(f"note: {note}")
    if files.tiny:
        click.echo("TINY RANDOM MODEL - NOT CLINICAL")


def _check_radialog_v1(device: str | None) -> None:
    import torch

    from radialog.settings import get_settings
    from workers.models.radialog_v1.backend import model_version
    from workers.models.radialog_v1.files import locate
    from workers.models.radialog_v1.loader import load_radialog_v1
    from workers.models.radialog_v2.checkpoint_io import ModelFileError

    settings = get_settings()
    device = device or settings.device
    try:
        files = locate(settings.v1_dir, settings.v1_adapter, settings.v1_llm_dir, settings.v1_biovil_file)
        click.echo("files:")
        for path in files.all_files():
            click.echo(f"  {path}  {path.stat().st_size / 1e6:,.1f} MB")
        started = time.perf_counter()
        loaded = load_radialog_v1(files.root, files.adapter_dir, files.llm_dir, files.biovil, device)
    except ModelFileError as error:
        click.echo(f"MODEL CHECK FAILED: {error}", err=True)
        sys.exit(1)
    model = loaded.model
    assert model.llama_model is not None
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in loaded.seconds.items())
    click.echo(f"loaded in {time.perf_counter() - started:.1f} s  ({phases})")
    parts = [
        ("vision tower (BioViL-T, 1408)", model.visual_encoder),
        ("ln_vision + Q-Former", model.bridge),
        ("img_proj", model.img_proj),
        ("language model (LoRA merged)", model.llama_model),
        ("findings classifier", loaded.classifier),
    ]
    click.echo("parameters:")
    for name, part in parts:
        size = sum(p.numel() * p.element_size() for p in part.parameters())
        click.echo(f"  {name:<29} {_count(part):>15,}  {size / 2**30:6.2f} GiB")
    click.echo(
        f"device {loaded.device}, dtype {loaded.dtype} (BioViL-T, ln_vision, Q-Former float32; classifier "
        f"{loaded.classifier_dtype})"
    )
    if loaded.device.type == "cuda":
        click.echo(f"GPU memory allocated {torch.cuda.memory_allocated(loaded.device) / 2**30:.2f} GiB")
    if loaded.projector == "checkpoint":
        click.echo("projector: BioViL-T projector loaded from checkpoint_4.pth")
    else:
        click.echo(
            "projector: REPLAYED - checkpoint_4.pth holds no BioViL-T projector; using the reference's "
            "training-time random draws (seed 42), bit-exact with hi-ml's construction (README 'RaDialog v1')"
        )
    click.echo(f"algorithm version (SR) {model_version(loaded.projector)}")
    click.echo(f"files sha256 {loaded.sha256}")
    for note in loaded.notes:
        click.echo(f"note: {note}")
    if files.tiny:
        click.echo("TINY RANDOM MODEL - NOT CLINICAL")
