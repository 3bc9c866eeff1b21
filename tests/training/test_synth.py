"""`dpa synth`: deterministic clips, exact masks, the pre-processed layout on disk."""

import json

import cv2
import numpy as np
import pytest

from dpa.cli import main
from dpa.errors import DpaError
from dpa.images import read_rgb
from dpa.runtime.flow import DISFlow, flow_to_rgb, offline_flow
from dpa.synthetic import clip_rng, generate_clip, sample_scene
from dpa.training.synth import write_dataset


def test_same_seed_same_clip_different_seed_different_clip():
    frames_a, masks_a = generate_clip(clip_rng(7, 0), 4, 64)
    frames_b, masks_b = generate_clip(clip_rng(7, 0), 4, 64)
    frames_c, _ = generate_clip(clip_rng(8, 0), 4, 64)
    frames_d, _ = generate_clip(clip_rng(7, 1), 4, 64)
    assert all(np.array_equal(a, b) for a, b in zip(frames_a, frames_b, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(masks_a, masks_b, strict=True))
    assert not np.array_equal(frames_a[0], frames_c[0])
    assert not np.array_equal(frames_a[0], frames_d[0])


def test_clip_shapes_and_motion():
    frames, masks = generate_clip(clip_rng(0, 3), 6, 96)
    assert len(frames) == len(masks) == 6
    assert all(f.shape == (96, 96, 3) and f.dtype == np.uint8 for f in frames)
    assert all(m.shape == (96, 96) and m.dtype == bool for m in masks)
    assert not np.array_equal(frames[0], frames[1])  # camera and objects move


@pytest.mark.parametrize("index", range(12))
def test_masks_are_exactly_the_drawn_objects(index):
    scene = sample_scene(clip_rng(11, index), 64)
    frames, masks = generate_clip(clip_rng(11, index), 5, 64)
    for t in range(5):
        frame, mask = scene.render(t)
        assert np.array_equal(frame, frames[t]) and np.array_equal(mask, masks[t])
        assert mask.any(), "every frame shows at least one object"
        assert np.array_equal(mask, np.logical_or.reduce(scene.object_masks(t)))
        background = scene.background(t)
        assert np.array_equal(frame[~mask], background[~mask])  # outside the mask: the background, untouched
        changed = np.any(frame[mask] != background[mask], axis=-1)
        assert changed.mean() > 0.8  # inside: the objects' own pixels


def test_objects_sometimes_occlude_each_other():
    overlapping = 0
    for index in range(40):
        scene = sample_scene(clip_rng(5, index), 64)
        if len(scene.objects) == 2:
            overlapping += any(np.logical_and(*scene.object_masks(t)).any() for t in range(12))
    assert overlapping >= 2


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_byte_identical_regeneration(tmp_path):
    manifest = write_dataset(tmp_path / "a", clips=2, frames=3, size=48, seed=4, split="val", progress=False)
    root = tmp_path / "a" / "val"
    assert manifest == root / "manifest.json"
    info = json.loads(manifest.read_text())
    assert info["seed"] == 4 and info["clips"] == 2 and info["frames"] == 3 and info["size"] == 48
    assert info["flow"]["estimator"] == "dis" and info["sequences"] == ["clip0000", "clip0001"]

    dis = DISFlow("fast")
    for index, sequence in enumerate(info["sequences"]):
        _, masks = generate_clip(clip_rng(4, index), 3, 48)
        stored = [read_rgb(root / "RGB" / sequence / f"{t:05d}.jpg") for t in range(3)]
        for t in range(3):
            assert stored[t].shape == (48, 48, 3)
            gt = cv2.imread(str(root / "GT" / sequence / f"{t:05d}.png"), cv2.IMREAD_UNCHANGED)
            assert gt.dtype == np.uint8 and set(np.unique(gt)) <= {0, 255}
            assert np.array_equal(gt == 255, masks[t])
            flow = read_rgb(root / "FLOW" / sequence / f"{t:05d}.png")
            assert np.array_equal(flow, flow_to_rgb(offline_flow(stored, t, dis)))  # from the stored JPEGs

    write_dataset(tmp_path / "b", clips=2, frames=3, size=48, seed=4, split="val", progress=False)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    write_dataset(tmp_path / "c", clips=2, frames=3, size=48, seed=5, split="val", progress=False)
    assert _tree_bytes(tmp_path / "a" / "val" / "RGB") != _tree_bytes(tmp_path / "c" / "val" / "RGB")


def test_refuses_to_overwrite_without_flag(tmp_path):
    write_dataset(tmp_path, clips=1, frames=2, size=32, seed=0, progress=False)
    with pytest.raises(DpaError, match="--overwrite"):
        write_dataset(tmp_path, clips=1, frames=2, size=32, seed=0, progress=False)
    write_dataset(tmp_path, clips=1, frames=2, size=32, seed=1, overwrite=True, progress=False)
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DpaError, match="refusing"):
        write_dataset(tmp_path, clips=1, frames=2, size=32, split="other", overwrite=True, progress=False)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_command_line(tmp_path, capsys):
    out = tmp_path / "synth"
    code = main(["synth", "--out", str(out), "--clips", "2", "--frames", "2", "--size", "32", "--seed", "3"])
    assert code == 0
    assert sorted(p.name for p in (out / "train" / "FLOW").iterdir()) == ["clip0000", "clip0001"]
    assert len(list((out / "train" / "RGB" / "clip0001").glob("*.jpg"))) == 2
    assert main(["synth", "--out", str(out), "--clips", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
