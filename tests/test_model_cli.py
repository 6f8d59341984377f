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
