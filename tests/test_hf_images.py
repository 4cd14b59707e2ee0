"""The hub image loader on small parquet files and image folders written by the tests, offline."""

from __future__ import annotations

import io
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from gradsmooth.data.hf_images import HFImagesConfig, load_hf_image_splits, stratified_split

CLASS_NAMES = ["cat", "dog", "fox", "owl"]
TRAIN_SIZE = 40
TEST_SIZE = 8
SIDE = 12
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Keep datasets and huggingface_hub offline and fail any TCP/UDP connection attempt."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # Both libraries read the variables once at import, so the module constants are patched too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    original_connect = socket.socket.connect

    def local_only_connect(sock, address):
        if sock.family != socket.AF_UNIX:
            raise OSError(f"network access during a test: connect to {address}")
        return original_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only_connect)


def random_images(count: int, mode: str, seed: int) -> list:
    rng = np.random.default_rng(seed)
    shape = (SIDE, SIDE, 3) if mode == "RGB" else (SIDE, SIDE)
    return [PILImage.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(count)]


def class_labels(count: int) -> list:
    return [index % len(CLASS_NAMES) for index in range(count)]


def write_parquet(path: Path, images: list, labels: list, class_label: bool = True) -> None:
    from datasets import ClassLabel, Dataset, Features, Image, Value

    label_feature = ClassLabel(names=CLASS_NAMES) if class_label else Value("int64")
    features = Features({"img": Image(), "label": label_feature})
    Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(str(path))


@pytest.fixture
def parquet_files(tmp_path) -> dict:
    """Write RGB train and test parquet files and return the data_files mapping."""
    directory = tmp_path / "parquet"
    directory.mkdir()
    write_parquet(directory / "train.parquet", random_images(TRAIN_SIZE, "RGB", seed=1), class_labels(TRAIN_SIZE))
    write_parquet(directory / "test.parquet", random_images(TEST_SIZE, "RGB", seed=2), class_labels(TEST_SIZE))
    return {"train": str(directory / "train.parquet"), "test": str(directory / "test.parquet")}


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Write grayscale PNGs as root/<split>/<class>/<n>.png and return root."""
    root = tmp_path / "folder"
    for split, count, seed in (("train", TRAIN_SIZE, 3), ("test", TEST_SIZE, 4)):
        for index, (image, label) in enumerate(zip(random_images(count, "L", seed), class_labels(count))):
            class_dir = root / split / CLASS_NAMES[label]
            class_dir.mkdir(parents=True, exist_ok=True)
            image.save(class_dir / f"{index}.png")
    return root


def parquet_config(tmp_path, data_files: dict, **overrides) -> HFImagesConfig:
    values = dict(path="parquet", data_files=data_files, cache_dir=str(tmp_path / "cache"), image_size=SIDE)
    values.update(overrides)
    return HFImagesConfig(**values)


def image_key(row: dict, column: str = "img") -> bytes:
    return np.asarray(row[column]).tobytes()


def test_parquet_splits_shapes_and_labels(tmp_path, parquet_files):
    splits = load_hf_image_splits(parquet_config(tmp_path, parquet_files, val_fraction=0.2))

    assert splits.num_classes == len(CLASS_NAMES)
    assert splits.channels == 3
    assert splits.image_size == SIDE
    assert len(splits.train) == 32
    assert len(splits.val) == 8
    assert len(splits.test) == TEST_SIZE
    for dataset in (splits.train, splits.val, splits.test):
        image, label = dataset[0]
        assert image.shape == (3, SIDE, SIDE)
        assert image.dtype == torch.float32
        assert isinstance(label, int)
        assert 0 <= label < len(CLASS_NAMES)


def test_parquet_normalised_with_train_statistics(tmp_path, parquet_files):
    splits = load_hf_image_splits(parquet_config(tmp_path, parquet_files, augment=False))

    images = torch.stack([splits.train[index][0] for index in range(len(splits.train))])
    per_channel = images.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(dim=1, correction=0), torch.ones(3), atol=1e-4, rtol=0)


def test_configured_mean_std_used(tmp_path, parquet_files):
    config = parquet_config(tmp_path, parquet_files, augment=False, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    splits = load_hf_image_splits(config)

    row = splits.test.dataset[0]
    expected = torch.from_numpy(np.asarray(row["img"], dtype=np.float32) / 255.0).permute(2, 0, 1)
    torch.testing.assert_close(splits.test[0][0], expected)


def test_parquet_directory_infers_splits(tmp_path, parquet_files):
    directory = str(Path(parquet_files["train"]).parent)
    splits = load_hf_image_splits(HFImagesConfig(path=directory, cache_dir=str(tmp_path / "cache"), image_size=SIDE))

    assert len(splits.train) + len(splits.val) == TRAIN_SIZE
    assert len(splits.test) == TEST_SIZE
    assert splits.num_classes == len(CLASS_NAMES)


def test_plain_parquet_struct_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def encode(image) -> dict:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    data_files = {}
    for split, count, seed in (("train", TRAIN_SIZE, 5), ("test", TEST_SIZE, 6)):
        table = pa.table(
            {
                "pixels": [encode(image) for image in random_images(count, "RGB", seed)],
                "target": [2 * label for label in class_labels(count)],
            }
        )
        data_files[split] = str(tmp_path / f"{split}.parquet")
        pq.write_table(table, data_files[split])
    config = parquet_config(tmp_path, data_files, image_column="pixels", label_column="target")

    splits = load_hf_image_splits(config)

    assert splits.num_classes == 2 * (len(CLASS_NAMES) - 1) + 1
    assert splits.train[0][0].shape == (3, SIDE, SIDE)


def test_integer_labels_count_max_plus_one(tmp_path):
    data_files = {}
    for split, count, seed in (("train", TRAIN_SIZE, 7), ("test", TEST_SIZE, 8)):
        data_files[split] = str(tmp_path / f"{split}.parquet")
        labels = [1 + label for label in class_labels(count)]
        write_parquet(Path(data_files[split]), random_images(count, "RGB", seed), labels, class_label=False)

    splits = load_hf_image_splits(parquet_config(tmp_path, data_files))

    assert splits.num_classes == len(CLASS_NAMES) + 1


def test_image_folder_labels_from_directories(tmp_path, image_folder):
    config = HFImagesConfig(
        path="imagefolder",
        data_dir=str(image_folder),
        image_column="image",
        cache_dir=str(tmp_path / "cache"),
        image_size=SIDE,
        channels=1,
    )
    splits = load_hf_image_splits(config)

    assert splits.num_classes == len(CLASS_NAMES)
    assert len(splits.train) + len(splits.val) == TRAIN_SIZE
    assert len(splits.test) == TEST_SIZE
    assert splits.test[0][0].shape == (1, SIDE, SIDE)
    test_labels = sorted(splits.test[index][1] for index in range(len(splits.test)))
    assert test_labels == sorted(class_labels(TEST_SIZE))


def test_grayscale_converted_to_rgb_and_resized(tmp_path, image_folder):
    config = HFImagesConfig(
        path="imagefolder",
        data_dir=str(image_folder),
        image_column="image",
        cache_dir=str(tmp_path / "cache"),
        image_size=20,
        channels=3,
    )
    splits = load_hf_image_splits(config)

    image, _ = splits.test[0]
    assert image.shape == (3, 20, 20)
    # Gray replicated to three equal channels stays equal after per-channel normalisation
    # because the three channel statistics are equal too.
    torch.testing.assert_close(image[0], image[1])
    torch.testing.assert_close(image[0], image[2])


def test_rgb_converted_to_grayscale_and_resized(tmp_path, parquet_files):
    config = parquet_config(tmp_path, parquet_files, channels=1, image_size=8, augment=False, mean=[0.0], std=[1.0])
    splits = load_hf_image_splits(config)

    image, _ = splits.test[0]
    assert image.shape == (1, 8, 8)
    assert splits.channels == 1
    assert float(image.min()) >= 0.0
    assert float(image.max()) <= 1.0


def test_constant_image_resize_keeps_value(tmp_path):
    data_files = {}
    for split, count in (("train", TRAIN_SIZE), ("test", TEST_SIZE)):
        images = [PILImage.new("RGB", (SIDE, SIDE), (51, 102, 204)) for _ in range(count)]
        data_files[split] = str(tmp_path / f"{split}.parquet")
        write_parquet(Path(data_files[split]), images, class_labels(count))
    config = parquet_config(tmp_path, data_files, image_size=30, augment=False, mean=[0.0] * 3, std=[1.0] * 3)

    image, _ = load_hf_image_splits(config).test[0]

    assert image.shape == (3, 30, 30)
    expected = torch.tensor([51, 102, 204], dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 30, 30)
    torch.testing.assert_close(image, expected)


def test_constant_images_need_configured_std(tmp_path):
    data_files = {}
    for split, count in (("train", TRAIN_SIZE), ("test", TEST_SIZE)):
        images = [PILImage.new("RGB", (SIDE, SIDE), (10, 20, 30)) for _ in range(count)]
        data_files[split] = str(tmp_path / f"{split}.parquet")
        write_parquet(Path(data_files[split]), images, class_labels(count))

    with pytest.raises(ValueError, match="data.std"):
        load_hf_image_splits(parquet_config(tmp_path, data_files))


def test_val_carve_stratified_disjoint_repeatable(tmp_path, parquet_files):
    config = parquet_config(tmp_path, parquet_files, val_fraction=0.2, split_seed=3)
    first = load_hf_image_splits(config)
    second = load_hf_image_splits(config)

    val_labels = [first.val[index][1] for index in range(len(first.val))]
    assert Counter(val_labels) == {label: 2 for label in range(len(CLASS_NAMES))}

    train_keys = [image_key(row) for row in first.train.dataset]
    val_keys = [image_key(row) for row in first.val.dataset]
    assert set(train_keys).isdisjoint(val_keys)
    assert len(set(train_keys) | set(val_keys)) == TRAIN_SIZE

    assert [image_key(row) for row in second.val.dataset] == val_keys
    assert [image_key(row) for row in second.train.dataset] == train_keys


def test_max_train_examples_keeps_val(tmp_path, parquet_files):
    full = load_hf_image_splits(parquet_config(tmp_path, parquet_files, val_fraction=0.2))
    small = load_hf_image_splits(parquet_config(tmp_path, parquet_files, val_fraction=0.2, max_train_examples=10))

    assert len(small.train) == 10
    assert [image_key(row) for row in small.val.dataset] == [image_key(row) for row in full.val.dataset]
    full_train_keys = {image_key(row) for row in full.train.dataset}
    assert {image_key(row) for row in small.train.dataset} <= full_train_keys


def test_named_val_split_used(tmp_path, parquet_files):
    data_files = dict(parquet_files, validation=parquet_files["test"])
    splits = load_hf_image_splits(parquet_config(tmp_path, data_files, val_split="validation"))

    assert len(splits.train) == TRAIN_SIZE
    assert len(splits.val) == TEST_SIZE


def test_stratified_split_rounds_per_class():
    labels = np.array([0] * 10 + [1] * 5)
    keep, held_out = stratified_split(labels, 0.2, seed=0)

    assert Counter(labels[held_out].tolist()) == {0: 2, 1: 1}
    assert len(keep) + len(held_out) == len(labels)
    assert set(keep.tolist()).isdisjoint(held_out.tolist())


def test_augment_off_repeatable(tmp_path, parquet_files):
    splits = load_hf_image_splits(parquet_config(tmp_path, parquet_files, augment=False))

    torch.testing.assert_close(splits.train[0][0], splits.train[0][0], atol=0, rtol=0)


def test_augment_on_varies_train_only(tmp_path, parquet_files):
    splits = load_hf_image_splits(parquet_config(tmp_path, parquet_files, augment=True))
    torch.manual_seed(0)

    first = splits.train[0][0]
    draws = [splits.train[0][0] for _ in range(10)]
    assert any(not torch.equal(first, draw) for draw in draws)
    torch.testing.assert_close(splits.val[0][0], splits.val[0][0], atol=0, rtol=0)
    torch.testing.assert_close(splits.test[0][0], splits.test[0][0], atol=0, rtol=0)


def test_hflip_off_leaves_crop_only(tmp_path, parquet_files):
    from torchvision.transforms import v2

    splits = load_hf_image_splits(parquet_config(tmp_path, parquet_files, augment=True, hflip=False))

    steps = [type(step) for step in splits.train.transform.transforms]
    assert v2.RandomCrop in steps
    assert v2.RandomHorizontalFlip not in steps


def test_dataloader_batches(tmp_path, parquet_files):
    splits = load_hf_image_splits(parquet_config(tmp_path, parquet_files))

    images, labels = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=4)))

    assert images.shape == (4, 3, SIDE, SIDE)
    assert labels.dtype == torch.int64


def test_missing_image_column_rejected(tmp_path, parquet_files):
    with pytest.raises(ValueError, match=r"'pixels' not found.*\['img', 'label'\].*data\.image_column"):
        load_hf_image_splits(parquet_config(tmp_path, parquet_files, image_column="pixels"))


def test_missing_label_column_rejected(tmp_path, parquet_files):
    with pytest.raises(ValueError, match=r"'target' not found.*\['img', 'label'\].*data\.label_column"):
        load_hf_image_splits(parquet_config(tmp_path, parquet_files, label_column="target"))


@pytest.mark.parametrize("key", ["train_split", "test_split", "val_split"])
def test_missing_split_rejected(tmp_path, parquet_files, key):
    config = parquet_config(tmp_path, parquet_files, **{key: "holdout"})

    with pytest.raises(ValueError, match=rf"data\.{key}='holdout': split not found.*available splits: \['train', 'test'\]"):
        load_hf_image_splits(config)


def test_non_image_column_rejected(tmp_path, parquet_files):
    with pytest.raises(ValueError, match=r"'label' .* has type ClassLabel.*not Image.*data\.image_column"):
        load_hf_image_splits(parquet_config(tmp_path, parquet_files, image_column="label", label_column="img"))


def test_string_labels_rejected(tmp_path):
    from datasets import Dataset, Features, Image, Value

    data_files = {}
    for split, count, seed in (("train", TRAIN_SIZE, 9), ("test", TEST_SIZE, 10)):
        labels = [CLASS_NAMES[label] for label in class_labels(count)]
        features = Features({"img": Image(), "label": Value("string")})
        dataset = Dataset.from_dict({"img": random_images(count, "RGB", seed), "label": labels}, features=features)
        data_files[split] = str(tmp_path / f"{split}.parquet")
        dataset.to_parquet(data_files[split])

    with pytest.raises(ValueError, match=r"'label' .* has type Value\('string'\).*data\.label_column"):
        load_hf_image_splits(parquet_config(tmp_path, data_files))


def test_negative_labels_rejected(tmp_path):
    data_files = {}
    for split, count, seed in (("train", TRAIN_SIZE, 11), ("test", TEST_SIZE, 12)):
        labels = [-1] + class_labels(count - 1)
        data_files[split] = str(tmp_path / f"{split}.parquet")
        write_parquet(Path(data_files[split]), random_images(count, "RGB", seed), labels, class_label=False)

    with pytest.raises(ValueError, match="negative label -1"):
        load_hf_image_splits(parquet_config(tmp_path, data_files))


def test_empty_split_rejected(tmp_path, parquet_files):
    empty = tmp_path / "empty.parquet"
    write_parquet(empty, [], [])
    data_files = dict(parquet_files, test=str(empty))

    with pytest.raises(ValueError, match="split 'test' .* is empty"):
        load_hf_image_splits(parquet_config(tmp_path, data_files))


def test_unused_empty_split_ignored(tmp_path, parquet_files):
    empty = tmp_path / "empty.parquet"
    write_parquet(empty, [], [])
    data_files = dict(parquet_files, validation=str(empty))

    splits = load_hf_image_splits(parquet_config(tmp_path, data_files))

    assert len(splits.train) + len(splits.val) == TRAIN_SIZE


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image_size", 0),
        ("channels", 2),
        ("channels", 4),
        ("val_fraction", 0.0),
        ("val_fraction", 1.0),
        ("val_fraction", 1.5),
        ("split_seed", -1),
        ("mean", [0.5, 0.5]),
        ("std", [0.2, 0.0, 0.2]),
        ("max_train_examples", 0),
        ("batch_size", 0),
        ("path", ""),
        ("image_column", ""),
        ("val_split", "train"),
        ("data_files", {}),
    ],
)
def test_invalid_config_rejected(key, value):
    with pytest.raises(ValueError, match=rf"data\.{key}") as error:
        HFImagesConfig(**{key: value})

    assert str(value) in str(error.value) or repr(value) in str(error.value)


def test_channels_message_lists_allowed_values():
    with pytest.raises(ValueError, match=r"data\.channels must be one of \[1, 3\]; got 2"):
        HFImagesConfig(channels=2)


@pytest.mark.parametrize("name", ["hf_images", "cifar10"])
def test_yaml_config_matches_schema(name):
    from omegaconf import OmegaConf

    values = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert list(values.pop("defaults")) == ["hf_images_schema", "_self_"]

    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HFImagesConfig), values))

    assert isinstance(config, HFImagesConfig)
    assert config.name == "hf_images"


def test_cifar10_yaml_paper_settings():
    from omegaconf import OmegaConf

    values = OmegaConf.load(CONFIG_DIR / "cifar10.yaml")
    values.pop("defaults")
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HFImagesConfig), values))

    assert config.path == "uoft-cs/cifar10"
    assert (config.image_column, config.label_column) == ("img", "label")
    assert (config.image_size, config.channels, config.batch_size) == (32, 3, 128)
    assert config.augment is True
