"""The torch-free checkpoint rules: what counts as committed, which one resume picks, what retention deletes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtrain.core import checkpoints
from dtrain.core.checkpoints import CheckpointError


def make(root: Path, step: int, *, marker: bool = True, damage: bool = False) -> Path:
    path = root / checkpoints.step_dir_name(step)
    path.mkdir(parents=True)
    payload = b"x" * 100
    (path / "__0_0.distcp").write_bytes(payload[:50] if damage else payload)
    size, digest = checkpoints.file_digest(path / "__0_0.distcp")
    manifest = {"format": checkpoints.FORMAT, "step": step, "epoch": 0, "batch": step, "time": 0,
                "files": {"__0_0.distcp": {"size": 100, "sha256": digest if not damage else "0" * 64}}}
    (path / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    if marker:
        (path / checkpoints.MARKER).write_text("{}")
    return path


def test_resume_picks_the_newest_good_checkpoint_and_says_what_it_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    make(root, 10)
    make(root, 20, damage=True)
    make(root, 30, marker=False)
    (root / "step_0000040.partial").mkdir()
    (root / checkpoints.LATEST).write_text("step_0000020")
    choice = checkpoints.choose_for_resume(tmp_path, "auto")
    assert choice.path == root / "step_0000010"
    assert "step_0000030 has no COMMITTED marker" in choice.notes[0]
    assert "__0_0.distcp has 50 bytes, the manifest says 100" in choice.notes[1]


def test_resume_never_and_a_fresh_run(tmp_path):
    make(tmp_path / "checkpoints", 10)
    assert checkpoints.choose_for_resume(tmp_path, "never").path is None
    assert checkpoints.choose_for_resume(tmp_path / "fresh", "auto") == checkpoints.Choice(None, ())


def test_an_explicit_checkpoint_must_verify(tmp_path):
    bad = make(tmp_path / "checkpoints", 20, damage=True)
    with pytest.raises(CheckpointError, match="has 50 bytes"):
        checkpoints.choose_for_resume(tmp_path, str(bad))
    with pytest.raises(CheckpointError, match="partial save"):
        (tmp_path / "checkpoints" / "step_0000030.partial").mkdir()
        checkpoints.choose_for_resume(tmp_path, str(tmp_path / "checkpoints" / "step_0000030.partial"))


def test_a_corrupt_byte_is_caught_by_the_checksum(tmp_path):
    path = make(tmp_path / "checkpoints", 10)
    (path / "__0_0.distcp").write_bytes(b"y" * 100)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        checkpoints.verify(path)


def test_retention_keeps_the_newest_and_never_the_one_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        make(root, step)
    (root / checkpoints.LATEST).write_text("step_0000010")
    victims = checkpoints.retention_victims(root, keep_last=2)
    assert [p.name for p in victims] == ["step_0000020"]
    assert checkpoints.retention_victims(root, keep_last=None) == []


def test_listing_marks_latest_and_damage(tmp_path):
    root = tmp_path / "checkpoints"
    make(root, 10)
    make(root, 20, damage=True)
    (root / checkpoints.LATEST).write_text("step_0000010")
    rows = {row["name"]: row for row in checkpoints.describe(root)}
    assert rows["step_0000010"]["latest"] and rows["step_0000010"]["state"] == "committed"
    assert rows["step_0000020"]["state"] == "damaged"


def test_ckpt_verify_names_every_damaged_file(tmp_path):
    from conftest import run_dtrain

    root = tmp_path / "checkpoints"
    good = make(root, 10)
    bad = make(root, 20)
    for name in ("b.bin", "c.bin"):
        (bad / name).write_bytes(b"z" * 64)
    manifest = json.loads((bad / checkpoints.MANIFEST).read_text())
    manifest["files"].update({name: {"size": 64, "sha256": checkpoints.file_digest(bad / name)[1]}
                              for name in ("b.bin", "c.bin")})
    (bad / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    flipped = bytearray((bad / "__0_0.distcp").read_bytes())
    flipped[7] ^= 0x01
    (bad / "__0_0.distcp").write_bytes(bytes(flipped))  # one bit
    (bad / "b.bin").write_bytes(b"z" * 10)  # truncated
    (bad / "c.bin").unlink()  # missing
    out = run_dtrain("ckpt", "verify", str(tmp_path))
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines()[0] == "step_0000020: damaged"
    assert f"{bad / '__0_0.distcp'} does not match its checksum" in out.stdout
    assert f"{bad / 'b.bin'} has 10 bytes, the manifest says 64" in out.stdout
    assert f"{bad / 'c.bin'} is missing" in out.stdout
    assert "step_0000010: verified" in out.stdout
    one = run_dtrain("ckpt", "verify", str(tmp_path), "step_0000010")  # only that one is read
    assert one.returncode == 0 and one.stdout.strip() == "step_0000010: verified"
    unknown = run_dtrain("ckpt", "verify", str(tmp_path), "step_0000030")
    assert unknown.returncode == 2 and "has no checkpoint step_0000030" in unknown.stderr
    listing = run_dtrain("ckpt", "ls", str(tmp_path), "--verify").stdout
    assert "damaged" in listing and "verified" in listing and good.name in listing


def test_a_checkpoint_of_a_newer_format_is_refused_naming_both(tmp_path):
    path = make(tmp_path / "checkpoints", 10)
    manifest = json.loads((path / checkpoints.MANIFEST).read_text())
    (path / checkpoints.MANIFEST).write_text(json.dumps({**manifest, "format": "dtrain-checkpoint-2"}))
    with pytest.raises(checkpoints.FormatError, match="is of format 'dtrain-checkpoint-2', and dtrain .* reads "
                                                      "dtrain-checkpoint-1"):
        checkpoints.choose_for_resume(tmp_path, "auto")  # not passed over as damage: auto stops there too
