"""The ``setok`` command line: tokenize (bundled photo, explicit paths, bad paths, a local tower), info."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from setok_model import cli

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"(\d+) patches -> (\d+) tokens \| load [\d.]+ ms, features [\d.]+ ms, cluster [\d.]+ ms, draw [\d.]+ ms, save [\d.]+ ms \| (.+\.png)")


def _tokenize(capsys, *argv):
    rc = cli.main(["tokenize", *argv])
    out = capsys.readouterr().out
    return rc, [LINE.search(line) for line in out.splitlines()]


def test_tokenize_bundled_photo_writes_a_cluster_map(tmp_path, capsys):
    rc, matches = _tokenize(capsys, "--out", str(tmp_path))
    assert rc == 0 and len(matches) == 1 and matches[0], "expected one line with patches, tokens and stage timings"
    patches, tokens, png = int(matches[0][1]), int(matches[0][2]), Path(matches[0][3])
    assert patches == 36 * 24  # 600 x 400 resized to a short side of 384, 16 px patches
    assert 2 <= tokens < patches
    assert png.parent == tmp_path and png.name == "coffee_clusters.png"
    with Image.open(png) as im, Image.open(cli.SAMPLE_IMAGE) as photo:
        assert im.format == "PNG"
        assert im.width == 2 * photo.width and im.height > photo.height  # photo | cluster map, under a title


def _quadrants(path: Path, size=128):
    """Four flat colours, one per quadrant."""
    im = Image.new("RGB", (size, size))
    half = size // 2
    for (x, y), colour in zip([(0, 0), (half, 0), (0, half), (half, half)], ["red", "blue", "yellow", "green"]):
        im.paste(colour, (x, y, x + half, y + half))
    im.save(path)


def test_tokenize_explicit_images_and_the_regions_follow_the_colours(tmp_path, capsys):
    _quadrants(tmp_path / "quad.png")
    Image.new("RGB", (96, 64), "gray").save(tmp_path / "flat.jpg")
    rc, matches = _tokenize(capsys, str(tmp_path / "quad.png"), str(tmp_path / "flat.jpg"), "--out", str(tmp_path / "maps"), "--size", "128")
    assert rc == 0 and all(matches) and len(matches) == 2
    assert [Path(m[3]).name for m in matches] == ["quad_clusters.png", "flat_clusters.png"]
    assert all(Path(m[3]).is_file() for m in matches)
    # no cluster spans two colours: each label lies in one quadrant
    with Image.open(tmp_path / "quad.png") as im:
        feats, (gh, gw) = cli.patch_descriptors(im.convert("RGB"), 16, 128)
    import setok_kernels

    labels = setok_kernels.dpc_cluster(feats[None], k=16, min_clusters=8).labels[0].view(gh, gw)
    quadrant = (torch.arange(gh)[:, None] >= gh // 2) * 2 + (torch.arange(gw)[None, :] >= gw // 2)
    for label in labels.unique():
        assert quadrant[labels == label].unique().numel() == 1


def test_bad_paths_give_a_clear_error_and_nonzero_exit(tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    assert cli.main(["tokenize", str(missing), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no such image" in err and str(missing) in err
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    assert cli.main(["tokenize", str(not_an_image), "--out", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["tokenize", "--k", "0", "--out", str(tmp_path)]) == 2
    assert "k must be >= 1" in capsys.readouterr().err


def test_tokenize_with_a_local_tiny_clip_tower(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8)
    torch.manual_seed(0)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path / "tower")
    rc, matches = _tokenize(capsys, "--tower", str(tmp_path / "tower"), "--k", "4", "--min-clusters", "3", "--out", str(tmp_path))
    assert rc == 0 and matches[0], "expected a result line"
    assert int(matches[0][1]) == 8 * 8  # the CLS token is dropped
    assert 1 <= int(matches[0][2]) <= 64
    assert Path(matches[0][3]).is_file()
    assert cli.main(["tokenize", "--tower", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such model directory" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "setok_model.cli", "tokenize", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert LINE.search(proc.stdout) and (tmp_path / "coffee_clusters.png").is_file()


def test_info_reports_the_backends(capsys):
    # needs setok_kernels.info (written by the lead)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "dpc_cluster" in out and "varlen_attention" in out


def test_bench_prints_a_table_with_every_op(capsys):
    assert cli.main(["bench", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for op in ("dpc_cluster", "pack_clusters", "segment_mean", "varlen_attention"):
        rows = [line for line in out.splitlines() if line.startswith(op)]
        assert rows and any(re.search(r"\s[\d.]+\s+[\d.]+x$", row) for row in rows), f"no timing for {op}"
