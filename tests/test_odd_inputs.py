"""Inputs that look unusual but must work (the bad ones are in test_bad_inputs_*.py): image folders of every PIL mode,
and a failed fresh run that leaves no nested folders behind."""
from __future__ import annotations

import numpy as np
from PIL import Image

from cli_support import TRAIN_FAST, check_ok, run_cli


def test_folder_of_mixed_image_modes_trains(tmp_path):
    """Grayscale, RGBA, 16-bit, palette, gray+alpha, 1-bit and CMYK JPEG images all become RGB."""
    folder = tmp_path / "modes"
    folder.mkdir()
    rng = np.random.default_rng(0)
    modes = ["L", "RGBA", "I;16", "P", "RGB", "LA", "CMYK", "1"]
    for i in range(24):
        mode = modes[i % len(modes)]
        if mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65536, (10, 12), dtype=np.uint16))
        else:
            image = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert(mode)
        image.save(folder / f"{i:02d}.{'jpg' if mode == 'CMYK' else 'png'}")
    result = check_ok(run_cli("train-pixels", "--dataset", "folder", "--data-dir", folder, *TRAIN_FAST,
                              "--out", tmp_path / "run"))
    assert "3x8x8" in result.output
    assert (tmp_path / "run" / "latest.pt").exists()


def test_failed_fresh_run_leaves_no_nested_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    result = run_cli("train-pixels", "--dataset", "folder", "--data-dir", "imgs", *TRAIN_FAST, "--out", "a/b/run")
    assert result.exit_code == 1 and "empty" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]
