"""Dataset layouts on small generated trees, and the torch datasets built on them."""

import logging
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dpa.constants import IMAGENET_MEAN, IMAGENET_STD
from dpa.errors import DpaError
from dpa.training.datasets import ClipDataset, MixedDataset, OfflineClip, SaliencyDataset
from dpa.training.layouts import (
    detect_layout,
    load_davis2016,
    load_duts,
    load_image_folders,
    load_preprocessed,
    load_sequences,
    load_youtube_vos,
)
from dpa.training.sequences import VideoSequence, read_mask_or_none

HEIGHT, WIDTH = 24, 32
SIZE = 32

# ------------------------------------------------------------------------------------------- tree builders


def frame_value(sequence: int, frame: int) -> int:
    """A gray level that identifies (sequence, frame) in generated images."""
    return 20 + 40 * sequence + 4 * frame


def write_image(path: Path, value, height: int = HEIGHT, width: int = WIDTH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = value
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    return path


def write_mask(path: Path, height: int = HEIGHT, width: int = WIDTH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((height, width), np.uint8)
    mask[4:12, 8:20] = 255
    assert cv2.imwrite(str(path), mask)
    return path


def write_palette_png(path: Path, indices: np.ndarray, palette) -> Path:
    """An 8-bit indexed PNG (colour type 3), written by hand so the test needs no PIL."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width = indices.shape
    raw = b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in indices)
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).ravel()))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


DAVIS_PALETTE = [(0, 0, 0), (236, 95, 103), (249, 145, 87), (250, 199, 100)]


def make_images_tree(root: Path, sequences=("bear", "cows"), frames: int = 6, flow: bool = True) -> Path:
    for s, name in enumerate(sequences):
        for i in range(frames):
            write_image(root / name / "JPEGImages" / f"{i:05d}.jpg", frame_value(s, i))
            write_mask(root / name / "Annotations" / f"{i:05d}.png")
            if flow:
                write_image(root / name / "FLOW" / f"{i:05d}.png", 255 - frame_value(s, i))
    return root


def make_davis_tree(root: Path) -> Path:
    for s, name in enumerate(("bear", "blackswan")):
        for i in range(4):
            write_image(root / "JPEGImages" / "480p" / name / f"{i:05d}.jpg", frame_value(s, i))
            write_mask(root / "Annotations" / "480p" / name / f"{i:05d}.png")
            write_image(root / "FLOW" / "480p" / name / f"{i:05d}.png", 200)
    sets = root / "ImageSets" / "480p"
    sets.mkdir(parents=True)
    line = "/JPEGImages/480p/{0}/{1:05d}.jpg /Annotations/480p/{0}/{1:05d}.png\n"
    (sets / "train.txt").write_text("".join(line.format("bear", i) for i in range(3)))
    (sets / "val.txt").write_text("".join(line.format("blackswan", i) for i in range(4)))
    return root


# ------------------------------------------------------------------------------------------- layouts


def test_davis2016_frame_image_sets(tmp_path):
    root = make_davis_tree(tmp_path)
    assert detect_layout(root) == "davis2016"
    train = load_davis2016(root, "train")
    assert [s.name for s in train] == ["bear"]
    assert train[0].frames == ["00000", "00001", "00002"]  # only the listed frames
    assert train[0].flow[0] == root / "FLOW" / "480p" / "bear" / "00000.png"
    assert train[0].masks[2] == root / "Annotations" / "480p" / "bear" / "00002.png"
    assert [s.name for s in load_sequences(root, split="val")] == ["blackswan"]
    both = load_sequences(root, layout="davis", split="all")
    assert [s.name for s in both] == ["bear", "blackswan"] and train.skipped_count == 0


def test_davis2016_sequence_name_image_sets_and_missing_split(tmp_path):
    root = make_davis_tree(tmp_path)
    for path in (root / "ImageSets" / "480p").iterdir():
        path.unlink()
    (root / "ImageSets" / "2016").mkdir()
    (root / "ImageSets" / "2016" / "train.txt").write_text("blackswan\n\n")
    train = load_davis2016(root, "train")
    assert [s.name for s in train] == ["blackswan"] and len(train[0]) == 4
    with pytest.raises(DpaError, match="ImageSets/480p/val.txt"):
        load_davis2016(root, "val")


def test_davis2016_missing_annotation_is_counted(tmp_path):
    root = make_davis_tree(tmp_path)
    (root / "Annotations" / "480p" / "blackswan" / "00001.png").unlink()
    (root / "JPEGImages" / "480p" / "blackswan" / "00003.jpg").unlink()  # listed but absent
    listing = load_davis2016(root, "val")
    sequence = listing[0]
    assert sequence.frames == ["00000", "00001", "00002"]
    assert sequence.masks[1] is None and sequence.annotated == [0, 2]
    assert listing.skipped_count == 2


def test_youtube_vos_palette_masks_with_two_objects(tmp_path):
    base = tmp_path / "train"
    for i in range(10):
        write_image(base / "JPEGImages" / "vid_a" / f"{i:05d}.jpg", frame_value(0, i))
        write_image(base / "FLOW" / "vid_a" / f"{i:05d}.png", 128)
    ids = np.zeros((HEIGHT, WIDTH), np.uint8)
    ids[2:6, 2:6] = 1
    ids[10:20, 20:30] = 2
    for i in (0, 5):  # annotated every 5th frame
        write_palette_png(base / "Annotations" / "vid_a" / f"{i:05d}.png", ids, DAVIS_PALETTE)
    assert detect_layout(tmp_path) == "youtube-vos"
    (sequence,) = load_sequences(tmp_path)
    assert len(sequence) == 10 and sequence.annotated == [0, 5] and sequence.mask_labels
    assert load_youtube_vos(base)[0].frames == sequence.frames  # ROOT given as the split folder
    mask = read_mask_or_none(sequence.masks[0], labels=True)
    np.testing.assert_array_equal(mask, ids > 0)  # both objects are foreground
    dataset = ClipDataset([sequence], SIZE, memory=3, augment=False)
    assert len(dataset) == 2  # queries: annotated frames only
    assert {dataset[i]["frame"] for i in range(2)} == {"00000", "00005"}


def test_opencv_reads_palette_pngs_as_colours_not_indices(tmp_path):
    """Why masks use "any non-black pixel": OpenCV expands palette PNGs to their colours."""
    ids = np.array([[0, 1], [2, 3]], np.uint8)
    path = write_palette_png(tmp_path / "p.png", ids, DAVIS_PALETTE)
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (2, 2, 3)
    assert tuple(decoded[0, 1][::-1]) == DAVIS_PALETTE[1]
    # a palette mask is foreground wherever the id is non-zero, even without labels=True
    np.testing.assert_array_equal(read_mask_or_none(path), ids > 0)


def test_mask_thresholds(tmp_path):
    gray = np.array([[0, 1, 127, 128, 255]], np.uint8)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    np.testing.assert_array_equal(read_mask_or_none(tmp_path / "gray.png"), [[0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(read_mask_or_none(tmp_path / "gray.png", labels=True), [[0, 1, 1, 1, 1]])
    assert read_mask_or_none(tmp_path / "absent.png") is None


def test_preprocessed_flat_with_underscores_in_sequence_names(tmp_path, caplog):
    split = tmp_path / "DAVIS_train"
    for s, name in enumerate(("dog_agility", "bear")):
        for i in range(3):
            write_image(split / "RGB" / f"{name}_{i:05d}.jpg", frame_value(s, i))
            write_mask(split / "GT" / f"{name}_{i:05d}.png")
            write_image(split / "FLOW" / f"{name}_{i:05d}.jpg", 180)
    write_image(split / "RGB" / "stray.jpg", 0)
    assert detect_layout(tmp_path, "DAVIS_train") == "preprocessed"
    with caplog.at_level(logging.WARNING):
        listing = load_preprocessed(tmp_path, "DAVIS_train")
    assert [s.name for s in listing] == ["bear", "dog_agility"]
    dog = listing[1]
    assert dog.frames == ["00000", "00001", "00002"]
    assert dog.rgb[1] == split / "RGB" / "dog_agility_00001.jpg"
    assert dog.flow[2] == split / "FLOW" / "dog_agility_00002.jpg"
    assert dog.flow_targets[0] == split / "FLOW" / "dog_agility_00000.png"
    assert listing.skipped_count == 1 and "stray" in caplog.text


def test_preprocessed_one_folder_per_sequence_as_dpa_synth_writes(tmp_path):
    for i in range(4):
        write_image(tmp_path / "train" / "RGB" / "clip0000" / f"{i:05d}.jpg", frame_value(0, i))
        write_mask(tmp_path / "train" / "GT" / "clip0000" / f"{i:05d}.png")
        write_image(tmp_path / "train" / "FLOW" / "clip0000" / f"{i:05d}.png", 100)
    (sequence,) = load_sequences(tmp_path, split="train")
    assert sequence.name == "clip0000" and sequence.frames == ["00000", "00001", "00002", "00003"]
    assert sequence.flow[3] == tmp_path / "train" / "FLOW" / "clip0000" / "00003.png"
    assert sequence.layout == "preprocessed"


def test_preprocessed_public_test_split_form(tmp_path):
    base = tmp_path / "DAVIS_test" / "black_swan"
    for i in range(3):
        write_image(base / "RGB" / f"black_swan_{i:05d}.jpg", frame_value(0, i))
        write_mask(base / "GT" / f"black_swan_{i:05d}.png")
        write_image(base / "FLOW" / f"black_swan_{i:05d}.jpg", 100)
    assert detect_layout(tmp_path, "DAVIS_test") == "preprocessed"
    (sequence,) = load_preprocessed(tmp_path, "DAVIS_test")
    assert sequence.name == "black_swan" and sequence.frames == ["00000", "00001", "00002"]
    assert sequence.masks[0] == base / "GT" / "black_swan_00000.png"
    assert sequence.flow_targets[1] == base / "FLOW" / "black_swan_00001.png"


def test_image_folders_with_a_separate_flow_root(tmp_path):
    root = make_images_tree(tmp_path / "data", flow=False)
    flow_root = tmp_path / "flow"
    for i in range(6):
        write_image(flow_root / "bear" / "FLOW" / f"{i:05d}.png", 50)
    assert detect_layout(root) == "images"
    listing = load_image_folders(root, flow_root=flow_root)
    bear, cows = listing
    assert bear.flow[0] == flow_root / "bear" / "FLOW" / "00000.png" and bear.with_flow == list(range(6))
    assert cows.flow == [None] * 6 and cows.flow_targets[0] == flow_root / "cows" / "FLOW" / "00000.png"


def test_duts_pairs_and_not_a_video_dataset(tmp_path):
    for split in ("DUTS-TR", "DUTS-TE"):
        for name in ("a", "b"):
            write_image(tmp_path / split / f"{split}-Image" / f"{split}_{name}.jpg", 90)
            write_mask(tmp_path / split / f"{split}-Mask" / f"{split}_{name}.png")
    write_image(tmp_path / "DUTS-TR" / "DUTS-TR-Image" / "lonely.jpg", 90)
    pairs = load_duts(tmp_path)
    assert len(pairs) == 4 and pairs.skipped_count == 1
    assert all(image.stem == mask.stem for image, mask in pairs)
    assert detect_layout(tmp_path) == "duts"
    with pytest.raises(DpaError, match="DUTS"):
        load_sequences(tmp_path)


def test_unrecognised_folder_says_what_it_looked_for(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DpaError, match="JPEGImages/480p"):
        load_sequences(tmp_path)
    with pytest.raises(DpaError, match="does not exist"):
        load_sequences(tmp_path / "absent")
    with pytest.raises(DpaError, match="unknown dataset layout"):
        load_sequences(tmp_path, layout="kitti")


def test_missing_flow_tells_how_to_compute_it(tmp_path):
    root = make_images_tree(tmp_path, flow=False)
    sequences = load_sequences(root)
    with pytest.raises(DpaError, match=rf"dpa flow --data {root} --layout images"):
        ClipDataset(sequences, SIZE)
    with pytest.raises(DpaError, match="dpa flow"):
        OfflineClip(sequences[0], SIZE)


def test_shared_davis_samples_load_as_image_folders(davis16):
    sequences = load_sequences(davis16)
    assert [s.name for s in sequences] == ["blackswan", "dog"]
    assert [len(s) for s in sequences] == [50, 60] and all(s.annotated == list(range(len(s))) for s in sequences)


# ------------------------------------------------------------------------------------------- datasets


def _decode_value(rgb: torch.Tensor) -> float:
    """Gray level of a constant normalised image (inverse of the ImageNet normalisation, channel 0)."""
    return float((rgb[0].mean() * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255)


def test_clip_dataset_shapes_dtypes_and_references(tmp_path):
    sequences = load_sequences(make_images_tree(tmp_path))
    dataset = ClipDataset(sequences, SIZE, memory=4, augment=False, seed=3)
    assert len(dataset) == 12
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["rgb"].shape == (3, SIZE, SIZE) and item["rgb"].dtype == torch.float32
        assert item["flow"].shape == (3, SIZE, SIZE) and item["flow"].dtype == torch.float32
        assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["reference_rgb"].shape == (4, 3, SIZE, SIZE)
        assert item["reference_flow"].shape == (4, 3, SIZE, SIZE)
        assert item["skipped"] == 0
        s = [sequence.name for sequence in sequences].index(item["sequence"])
        query = int(item["frame"])
        assert round(_decode_value(item["rgb"])) == frame_value(s, query)
        # references: frames of the same video, distinct, not the query
        values = [round(_decode_value(reference)) for reference in item["reference_rgb"]]
        frames = [(value - frame_value(s, 0)) / 4 for value in values]
        assert all(f in range(6) for f in frames), values
        assert len(set(frames)) == 4 and query not in frames


def test_clip_dataset_is_deterministic_per_seed_epoch_index(tmp_path):
    sequences = load_sequences(make_images_tree(tmp_path))
    first = ClipDataset(sequences, SIZE, memory=2, seed=7)
    second = ClipDataset(sequences, SIZE, memory=2, seed=7)
    a, b = first[5], second[5]
    for key in ("rgb", "flow", "mask", "reference_rgb", "reference_flow"):
        assert torch.equal(a[key], b[key]), key
    first.set_epoch(1)
    c = first[5]
    assert not all(torch.equal(a[key], c[key]) for key in ("rgb", "reference_rgb"))
    second.set_epoch(1)
    assert torch.equal(second[5]["reference_rgb"], c["reference_rgb"])


def test_clip_dataset_applies_one_augmentation_to_all_frames(tmp_path):
    root = tmp_path / "same"
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[3:9, 5:25] = (200, 40, 40)
    for i in range(5):
        path = root / "seq" / "JPEGImages" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        write_mask(root / "seq" / "Annotations" / f"{i:05d}.png")
        flow_path = root / "seq" / "FLOW" / f"{i:05d}.png"
        flow_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(flow_path), image)
    dataset = ClipDataset(load_sequences(root), SIZE, memory=3, augment=True, seed=0)
    for index in range(5):
        item = dataset[index]
        for k in range(3):
            assert torch.equal(item["reference_rgb"][k], item["rgb"])
            assert torch.equal(item["reference_flow"][k], item["flow"])


def test_clip_dataset_short_video_repeats_frames_and_samples_per_epoch(tmp_path):
    root = make_images_tree(tmp_path, sequences=("tiny",), frames=2)
    dataset = ClipDataset(load_sequences(root), SIZE, memory=4, augment=False, samples_per_epoch=9)
    assert len(dataset) == 9
    item = dataset[8]
    frames = {round((_decode_value(r) - frame_value(0, 0)) / 4) for r in item["reference_rgb"]}
    assert item["reference_rgb"].shape[0] == 4 and frames <= {0, 1}


def test_corrupt_files_are_skipped_and_counted(tmp_path, caplog):
    root = make_images_tree(tmp_path)
    (root / "bear" / "JPEGImages" / "00002.jpg").write_bytes(b"not a jpeg")
    (root / "cows" / "FLOW" / "00004.png").write_bytes(b"")
    dataset = ClipDataset(load_sequences(root), SIZE, memory=5, augment=True)
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(dataset))]
    assert sum(item["skipped"] for item in items) == 2  # each bad file reported once per process
    assert dataset.skipped == 2 and "00002.jpg" in caplog.text
    assert all(item["reference_rgb"].shape == (5, 3, SIZE, SIZE) for item in items)
    assert all(not (item["sequence"] == "bear" and item["frame"] == "00002") for item in items)


def test_saliency_dataset_normalisation_is_exact(tmp_path):
    value = (200, 100, 50)
    image = write_image(tmp_path / "img.png", value, SIZE, SIZE)  # PNG: exact pixel values
    mask = write_mask(tmp_path / "mask.png", SIZE, SIZE)
    dataset = SaliencyDataset([(image, mask)], SIZE, augment=False)
    item = dataset[0]
    expected = [
        (np.float32(v) / np.float32(255) - np.float32(m)) / np.float32(s)
        for v, m, s in zip(value, IMAGENET_MEAN, IMAGENET_STD, strict=True)
    ]
    for channel in range(3):
        assert torch.all(item["rgb"][channel] == torch.tensor(expected[channel], dtype=torch.float32))
        assert torch.all(item["flow"][channel] == torch.tensor(np.float32(value[channel]) / np.float32(255)))
    truth = np.zeros((SIZE, SIZE), np.float32)
    truth[4:12, 8:20] = 1
    assert torch.equal(item["mask"][0], torch.from_numpy(truth))
    augmented = SaliencyDataset([(image, mask)], 16, augment=True, seed=1)[0]
    assert augmented["rgb"].shape == (3, 16, 16) and augmented["mask"].shape == (1, 16, 16)


def test_mixed_dataset_probabilities_and_determinism(tmp_path):
    a = ClipDataset(load_sequences(make_images_tree(tmp_path / "a", sequences=("alpha",))), SIZE, memory=1)
    b = ClipDataset(load_sequences(make_images_tree(tmp_path / "b", sequences=("beta",))), SIZE, memory=1)
    only_a = MixedDataset([a, b], [1.0, 0.0], length=10, seed=0)
    assert {only_a[i]["sequence"] for i in range(10)} == {"alpha"}
    mixed = MixedDataset([a, b], [0.5, 0.5], length=200, seed=0)
    names = [mixed[i]["sequence"] for i in range(200)]
    assert 70 <= names.count("alpha") <= 130
    again = MixedDataset([a, b], [0.5, 0.5], length=200, seed=0)
    assert torch.equal(mixed[17]["reference_rgb"], again[17]["reference_rgb"])
    mixed.set_epoch(1)
    assert a.epoch == 1 and [mixed[i]["sequence"] for i in range(200)] != names


def test_offline_clip_reads_lazily_in_order(tmp_path):
    root = make_images_tree(tmp_path, sequences=("bear",), frames=5)
    (root / "bear" / "FLOW" / "00004.png").unlink()  # the last frame has no flow
    (root / "bear" / "JPEGImages" / "00002.jpg").write_bytes(b"\xff\xd8garbage")
    (sequence,) = load_sequences(root)
    clip = OfflineClip(sequence, SIZE)
    assert len(clip) == 5 and clip.frames == ["00000", "00001", "00002", "00003", "00004"]
    last = clip[4]
    assert last["rgb"].shape == (3, SIZE, SIZE) and last["rgb"].dtype == np.float32
    assert last["mask"].shape == (HEIGHT, WIDTH) and last["mask"].dtype == bool
    np.testing.assert_array_equal(last["flow"], clip[3]["flow"])  # nearest frame's flow
    with pytest.raises(DpaError, match="00002"):
        clip[2]
    assert [item["frame"] for item in clip] == ["00000", "00001", "00003", "00004"]
    assert clip.skipped == 1


def test_video_sequence_helpers():
    sequence = VideoSequence("s", ["0", "1"], [Path("a"), Path("b")], [None, Path("f")], [Path("m"), None])
    assert len(sequence) == 2 and sequence.annotated == [0] and sequence.with_flow == [1]
