"""`dpa flow` on tiny generated trees of each layout: where it writes, what, skipping and bad frames."""

import importlib.util
import logging
import shutil

import numpy as np
import pytest

from dpa.cli import main
from dpa.errors import DpaError
from dpa.images import read_rgb, write_image
from dpa.runtime.flow import DISFlow, flow_to_rgb, offline_flow
from dpa.synthetic import clip_rng, generate_clip
from dpa.training.synth import write_dataset

FRAMES = ("00000", "00001", "00002")


def _write_clip(folder, index, names=FRAMES, template="{}.jpg"):
    frames, _ = generate_clip(clip_rng(0, index), len(names), 48)
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in zip(names, frames, strict=True):
        write_image(folder / template.format(name), frame)


def _expected(frame_paths, size=352):
    """The flow images `dpa flow` writes by default: DIS on the frames resized to the paper's S = 352, at 352."""
    frames = [read_rgb(path) for path in frame_paths]
    dis = DISFlow("fast", size=size)
    return [flow_to_rgb(offline_flow(frames, t, dis)) for t in range(len(frames))]


def _check(frame_paths, flow_paths):
    for expected, path in zip(_expected(frame_paths), flow_paths, strict=True):
        assert np.array_equal(read_rgb(path), expected), path


def test_davis_layout(tmp_path):
    for index, sequence in enumerate(("bear", "camel")):
        _write_clip(tmp_path / "JPEGImages" / "480p" / sequence, index)
    assert main(["flow", "--data", str(tmp_path), "--layout", "davis"]) == 0
    for sequence in ("bear", "camel"):
        _check([tmp_path / "JPEGImages" / "480p" / sequence / f"{n}.jpg" for n in FRAMES],
               [tmp_path / "FLOW" / "480p" / sequence / f"{n}.png" for n in FRAMES])


def test_preprocessed_layout_folders_and_flat_files(tmp_path):
    _write_clip(tmp_path / "test" / "RGB" / "clip0000", 0)
    _write_clip(tmp_path / "train" / "RGB", 1, template="bmx-trees_{}.jpg")
    _write_clip(tmp_path / "train" / "RGB", 2, names=("7", "8", "10"), template="dog_{}.jpg")  # natural order
    _write_clip(tmp_path / "val" / "cows" / "RGB", 3)  # the public test form <split>/<seq>/RGB/
    assert main(["flow", "--data", str(tmp_path), "--layout", "preprocessed"]) == 0
    _check([tmp_path / "val" / "cows" / "RGB" / f"{n}.jpg" for n in FRAMES],
           [tmp_path / "val" / "cows" / "FLOW" / f"{n}.png" for n in FRAMES])
    _check([tmp_path / "test" / "RGB" / "clip0000" / f"{n}.jpg" for n in FRAMES],
           [tmp_path / "test" / "FLOW" / "clip0000" / f"{n}.png" for n in FRAMES])
    _check([tmp_path / "train" / "RGB" / f"bmx-trees_{n}.jpg" for n in FRAMES],
           [tmp_path / "train" / "FLOW" / f"bmx-trees_{n}.png" for n in FRAMES])
    _check([tmp_path / "train" / "RGB" / f"dog_{n}.jpg" for n in ("7", "8", "10")],
           [tmp_path / "train" / "FLOW" / f"dog_{n}.png" for n in ("7", "8", "10")])


def test_preprocessed_split_folder_as_data(tmp_path):
    _write_clip(tmp_path / "RGB" / "clip0000", 0)
    assert main(["flow", "--data", str(tmp_path), "--layout", "preprocessed"]) == 0
    _check([tmp_path / "RGB" / "clip0000" / f"{n}.jpg" for n in FRAMES],
           [tmp_path / "FLOW" / "clip0000" / f"{n}.png" for n in FRAMES])


def test_images_layout_into_another_root(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    for index, sequence in enumerate(("blackswan", "dog")):
        _write_clip(data / sequence / "JPEGImages", index)
    before = sorted(data.rglob("*"))
    assert main(["flow", "--data", str(data), "--layout", "images", "--out", str(out)]) == 0
    assert sorted(data.rglob("*")) == before  # nothing written into the dataset
    for sequence in ("blackswan", "dog"):
        _check([data / sequence / "JPEGImages" / f"{n}.jpg" for n in FRAMES],
               [out / sequence / "FLOW" / f"{n}.png" for n in FRAMES])


def test_youtube_vos_layout_every_split_where_training_reads_it(tmp_path):
    data, out = tmp_path / "ytvos", tmp_path / "flow"
    _write_clip(data / "train" / "JPEGImages" / "0a1b", 0)
    _write_clip(data / "valid" / "JPEGImages" / "ff00", 1)
    assert main(["flow", "--data", str(data), "--layout", "youtube-vos", "--out", str(out)]) == 0
    from dpa.cli import build_parser
    from dpa.training.flowgen import LAYOUTS

    # the CLI's --layout choices (a copy: the parser does not load OpenCV) offer every layout flowgen has
    with pytest.raises(DpaError) as error:  # argparse lists the choices it has: exactly flowgen's
        build_parser().parse_args(["flow", "--data", "d", "--layout", "nonsense"])
    assert str(error.value).endswith(f"(choose from {', '.join(map(repr, LAYOUTS))})")
    for split, video in (("train", "0a1b"), ("valid", "ff00")):
        _check([data / split / "JPEGImages" / video / f"{n}.jpg" for n in FRAMES],
               [out / split / "FLOW" / video / f"{n}.png" for n in FRAMES])
    from dpa.training.layouts import load_youtube_vos  # the training loader finds exactly these files

    (data / "train" / "Annotations" / "0a1b").mkdir(parents=True)
    listing = load_youtube_vos(data, "train", flow_root=out)
    assert [str(path) for path in listing[0].flow] == [
        str(out / "train" / "FLOW" / "0a1b" / f"{n}.png") for n in FRAMES]


def test_existing_files_are_kept_unless_overwrite(tmp_path, capsys):
    _write_clip(tmp_path / "seq" / "JPEGImages", 0)
    assert main(["flow", "--data", str(tmp_path), "--layout", "images"]) == 0
    target = tmp_path / "seq" / "FLOW" / "00001.png"
    write_image(target, np.zeros((48, 48, 3), np.uint8))
    capsys.readouterr()
    assert main(["flow", "--data", str(tmp_path), "--layout", "images"]) == 0
    assert "wrote 0 flow images, kept 3 existing" in capsys.readouterr().out
    assert not read_rgb(target).any()
    assert main(["flow", "--data", str(tmp_path), "--layout", "images", "--overwrite"]) == 0
    assert "wrote 3 flow images" in capsys.readouterr().out
    _check([tmp_path / "seq" / "JPEGImages" / f"{n}.jpg" for n in FRAMES],
           [tmp_path / "seq" / "FLOW" / f"{n}.png" for n in FRAMES])


def test_unreadable_frames_are_skipped_and_counted(tmp_path, capsys, caplog):
    frames = tmp_path / "seq" / "JPEGImages"
    _write_clip(frames, 0)
    (frames / "00001.jpg").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        assert main(["flow", "--data", str(tmp_path), "--layout", "images"]) == 0
    assert "skipped 1 unreadable frames" in capsys.readouterr().out
    assert "00001.jpg" in caplog.text
    flows = tmp_path / "seq" / "FLOW"
    assert sorted(p.name for p in flows.iterdir()) == ["00000.png", "00002.png"]
    # The readable frames pair with each other: 0 → 2 forward, 2 → 0 negated at the end.
    _check([frames / "00000.jpg", frames / "00002.jpg"], [flows / "00000.png", flows / "00002.png"])


@pytest.mark.parametrize("option", ["--flow-size", "--work-size"])  # the name dpa run/eval use, and the old one
def test_reproduces_the_flow_dpa_synth_wrote(tmp_path, option):
    write_dataset(tmp_path / "synth", clips=2, frames=3, size=48, seed=9, progress=False)
    assert main(["flow", "--data", str(tmp_path / "synth"), "--layout", "preprocessed", option, "48",
                 "--out", str(tmp_path / "again")]) == 0
    for written in sorted((tmp_path / "synth" / "train" / "FLOW").rglob("*.png")):
        again = tmp_path / "again" / written.relative_to(tmp_path / "synth")
        assert written.read_bytes() == again.read_bytes()


def test_single_frame_sequence_gets_white_flow(tmp_path):
    _write_clip(tmp_path / "seq" / "JPEGImages", 0, names=("00000",))
    assert main(["flow", "--data", str(tmp_path), "--layout", "images", "--preset", "ultrafast"]) == 0
    assert np.all(read_rgb(tmp_path / "seq" / "FLOW" / "00000.png") == 255)


def test_user_errors(tmp_path, capsys):
    _write_clip(tmp_path / "seq" / "JPEGImages", 0)
    assert main(["flow", "--data", str(tmp_path), "--layout", "davis"]) == 1
    assert "no frames found for layout 'davis'" in capsys.readouterr().err
    assert main(["flow", "--data", str(tmp_path / "absent"), "--layout", "images"]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_raft_without_torchvision_is_a_clear_error(tmp_path, capsys):
    _write_clip(tmp_path / "seq" / "JPEGImages", 0)
    assert main(["flow", "--data", str(tmp_path), "--layout", "images", "--estimator", "raft"]) == 1
    assert "torchvision" in capsys.readouterr().err


def test_davis16_samples(davis16, tmp_path):
    """The shared DAVIS 2016 samples (read-only) into a temporary root: one flow image per frame."""
    data = tmp_path / "davis16"
    data.mkdir()
    sequence = sorted(p for p in davis16.iterdir() if (p / "JPEGImages").is_dir())[0]
    (data / sequence.name / "JPEGImages").mkdir(parents=True)
    for frame in sorted((sequence / "JPEGImages").glob("*.jpg"))[:4]:
        shutil.copy(frame, data / sequence.name / "JPEGImages" / frame.name)
    out = tmp_path / "flow"
    assert main(["flow", "--data", str(data), "--layout", "images", "--out", str(out)]) == 0
    frames = sorted((data / sequence.name / "JPEGImages").glob("*.jpg"))
    _check(frames, [out / sequence.name / "FLOW" / f"{f.stem}.png" for f in frames])
