"""`radialog model make-tiny` and `radialog model check` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from radialog.cli import main


def test_make_tiny_then_check(tmp_path: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(main, ["model", "make-tiny", str(tmp_path / "tiny")])
    assert made.exit_code == 0, made.output
    assert "NOT CLINICAL" in made.output
    args = ["model", "check", "--model-dir", str(tmp_path / "tiny/radialog"), "--base-dir", str(tmp_path / "tiny/llava"),
            "--device", "cpu"]
    checked = runner.invoke(main, args)
    assert checked.exit_code == 0, checked.output
    assert "language model (LoRA merged)" in checked.output and "files sha256" in checked.output
    (tmp_path / "tiny/radialog/non_lora_trainables.bin").unlink()
    failed = runner.invoke(main, args)
    assert failed.exit_code == 1
    assert "non_lora_trainables.bin" in failed.output


def test_make_tiny_then_check_xraygpt(tmp_path: Path, monkeypatch) -> None:
    """Issue 16: the XrayGPT set is written in its published formats and loaded as a worker loads it; a broken
    checkpoint is named and the check fails."""
    from radialog.settings import get_settings

    runner = CliRunner()
    made = runner.invoke(main, ["model", "make-tiny", "--backend", "xraygpt", str(tmp_path / "tiny")])
    assert made.exit_code == 0, made.output
    assert "NOT CLINICAL" in made.output
    env = dict(line.split("=", 1) for line in made.output.splitlines() if line.startswith("RADIALOG_"))
    assert set(env) == {"RADIALOG_MODEL_BACKEND", "RADIALOG_XRAYGPT_VISION_DIR", "RADIALOG_XRAYGPT_LLM_DIR",
                        "RADIALOG_XRAYGPT_CHECKPOINT"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        checked = runner.invoke(main, ["model", "check", "--device", "cpu"])
        assert checked.exit_code == 0, checked.output
        for part in ("vision tower (EVA ViT-g)", "ln_vision + Q-Former", "llama_proj", "language model (Vicuna)",
                     "files sha256", "ignored optimizer, config, scaler, epoch"):
            assert part in checked.output
        import torch

        checkpoint = Path(env["RADIALOG_XRAYGPT_CHECKPOINT"])
        content = torch.load(checkpoint, weights_only=True)
        content["model"].pop("llama_proj.weight")
        torch.save(content, checkpoint)
        failed = runner.invoke(main, ["model", "check", "--device", "cpu"])
        assert failed.exit_code == 1
        assert "llama_proj.weight" in failed.output
    finally:
        get_settings.cache_clear()
