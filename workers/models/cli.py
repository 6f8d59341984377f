"""`radialog model ...`: write a tiny test checkpoint, or check that real model files load completely."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


@click.group()
def model() -> None:
    """The report model (RaDialog v2): test checkpoints and load checks."""


@model.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True)
def make_tiny_command(directory: Path, seed: int) -> None:
    """Write a tiny RANDOM RaDialog v2 + llava pair in the published layout (tests and demo only)."""
    from workers.models.radialog_v2.tiny import make_tiny

    model_dir, base_dir = make_tiny(directory, seed=seed)
    click.echo("TINY RANDOM MODEL - NOT CLINICAL (random weights, generates nonsense)")
    click.echo(f"RADIALOG_MODEL_DIR={model_dir.resolve()}")
    click.echo(f"RADIALOG_BASE_MODEL_DIR={base_dir.resolve()}")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@model.command("check")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="RaDialog v2 directory (default: RADIALOG_MODEL_DIR).")
@click.option("--base-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="llava-v1.5-7b directory (default: RADIALOG_BASE_MODEL_DIR).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N (default: RADIALOG_DEVICE).")
def check_command(model_dir: Path | None, base_dir: Path | None, device: str | None) -> None:
    """Load every model file exactly as a worker does and print what was found; exit 1 on any problem."""
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
    click.echo(f"loaded in {time.perf_counter() - started:.1f} s  ({', '.join(f'{k} {v:.1f}s' for k, v in loaded.seconds.items())})")
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
    if loaded.files.tiny:
        click.echo("TINY RANDOM MODEL - NOT CLINICAL")
