"""The ``setok`` command line: tokenize (bundled photo, explicit paths, bad paths, a local tower), info."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="the command line needs pillow (extra 'cli')")

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
    assert capsys.readouterr().err == "setok: error: tokenize: argument --k: must be >= 1, got 0\n"


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


# ---------------------------------------------------------------- hostile input (issue 13)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("setok: error: ") and "Traceback" not in err, err
    return err


def test_errors_are_one_line_on_stderr_with_status_2_and_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for argv in (["tokenize", str(tmp_path / "nope.png")], ["tokenize", "--patch", "1"], ["bench", "--repeats", "0"], ["frobnicate"]):
        proc = subprocess.run([sys.executable, "-m", "setok_model.cli", *argv], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", (argv, proc)
        assert proc.stderr.startswith("setok: error: ") and proc.stderr.count("\n") == 1, (argv, proc.stderr)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--patch", "0"], "argument --patch: must be >= 2, got 0"),
        (["--patch", "1"], "argument --patch: must be >= 2, got 1"),
        (["--size", "-3"], "argument --size: must be >= 1, got -3"),
        (["--max-clusters", "0"], "argument --max-clusters: must be >= 1, got 0"),
        (["--min-clusters", "x"], "argument --min-clusters: expected an integer, got 'x'"),
        (["--threshold", "nan"], "argument --threshold: must not be NaN"),
        (["--device", "bogus"], "--device: unknown device 'bogus'"),
        (["--device", "meta"], "--device: 'meta' is not supported"),
        (["--backend", "fast"], "--backend: unknown backend 'fast'"),
    ],
)
def test_bad_arguments_are_refused_before_any_output(tmp_path, capsys, argv, message):
    out = tmp_path / "maps"
    assert cli.main(["tokenize", *argv, "--out", str(out)]) == 2
    assert message in _error_line(capsys)
    assert not out.exists(), "nothing is written"


def test_bad_output_paths_are_refused(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert cli.main(["tokenize", "--out", str(afile)]) == 2
    assert "exists and is not a directory" in _error_line(capsys)
    assert cli.main(["tokenize", "--out", str(afile / "sub")]) == 2
    assert "cannot create the directory" in _error_line(capsys)
    assert afile.read_text() == "keep me"
    (tmp_path / "maps" / "coffee_clusters.png").mkdir(parents=True)
    assert cli.main(["tokenize", "--out", str(tmp_path / "maps")]) == 2
    assert "exist and are not files" in _error_line(capsys)


def test_one_bad_image_among_good_ones_writes_nothing(tmp_path, capsys):
    _quadrants(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG signature, no image
    out = tmp_path / "maps"
    assert cli.main(["tokenize", str(tmp_path / "good.png"), str(tmp_path / "bad.png"), "--out", str(out)]) == 2
    assert "cannot read" in _error_line(capsys) and not out.exists()
    (tmp_path / "other").mkdir()
    _quadrants(tmp_path / "other" / "good.png")
    assert cli.main(["tokenize", str(tmp_path / "good.png"), str(tmp_path / "other" / "good.png"), "--out", str(out)]) == 2
    assert "several inputs would write the same map: good_clusters.png" in _error_line(capsys) and not out.exists()


def test_thin_and_huge_images_are_capped(tmp_path, capsys, monkeypatch):
    Image.new("RGB", (600, 3), "teal").save(tmp_path / "thin.png")
    assert cli.main(["tokenize", str(tmp_path / "thin.png"), "--out", str(tmp_path / "maps")]) == 2
    err = _error_line(capsys)
    assert "115200 patches (24 x 4800 at --size 384, --patch 16) exceed --max-patches 4096" in err
    assert not (tmp_path / "maps").exists()
    # a raised cap (and a smaller size) runs it
    rc, matches = _tokenize(capsys, str(tmp_path / "thin.png"), "--size", "8", "--patch", "4", "--max-patches", "800",
                            "--out", str(tmp_path / "maps"))
    assert rc == 0 and matches[0] and int(matches[0][1]) == 2 * 400
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # the photo is far past twice this
    assert cli.main(["tokenize", "--out", str(tmp_path / "big")]) == 2
    assert "too large to decode safely" in _error_line(capsys)


def test_a_tiny_image_has_fewer_patches_than_k(tmp_path, capsys):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "tiny.png")
    rc, matches = _tokenize(capsys, str(tmp_path / "tiny.png"), "--k", "64", "--out", str(tmp_path))
    assert rc == 0 and matches[0] and int(matches[0][1]) == 24 * 24


def test_patch_features_are_finite_on_flat_thin_and_single_patch_images():
    for size in ((64, 64), (300, 2), (2, 2), (17, 5)):
        for patch in (2, 3, 16):
            feats, (gh, gw) = cli.patch_descriptors(Image.new("RGB", size, "gray"), patch, 8)
            assert feats.shape[0] == gh * gw and torch.isfinite(feats).all(), (size, patch)
    with pytest.raises(ValueError, match="patch must be >= 2"):
        cli.patch_descriptors(Image.new("RGB", (8, 8)), 1, 8)


def test_a_tower_with_nan_features_is_refused(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    model = transformers.CLIPVisionModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_norm1.bias"):
                param.fill_(float("nan"))
    model.save_pretrained(tmp_path / "tower")
    capsys.readouterr()
    assert cli.main(["tokenize", "--tower", str(tmp_path / "tower"), "--out", str(tmp_path / "maps")]) == 2
    assert "--tower features hold NaN or Inf" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "maps" / "coffee_clusters.png").exists()
