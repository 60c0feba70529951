"""Each data.source format: JSONL, CSV, split directories, HF datasets, WebDataset dir / list / brace."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvlm.data.decode import SkipCounter
from data_fixtures import write_shards
from qvlm.data.records import DataSourceError, iter_records
from qvlm.data.sources import FileDataset, open_dataset
from qvlm.data.webdataset import ShardStream, expand_braces, expand_shards


def make_images(folder: Path, n: int) -> list[str]:
    (folder / "pics").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (8 + i, 6), (10 * i, 0, 0)).save(folder / "pics" / f"{i}.png")
        names.append(f"pics/{i}.png")
    return names


def read_all(spec, **kw):
    counter = SkipCounter()
    return list(iter_records(open_dataset(spec, **kw), counter)), counter


def test_jsonl_relative_paths_captions_and_messages(tmp_path):
    names = make_images(tmp_path / "data", 3)
    chat = [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "red"}]
    rows = [{"image": names[0], "caption": "zero"}, {"image": names[1], "messages": chat, "key": "k1"},
            {"image": names[2], "caption": "two", "attributes": {"left": None}},
            {"image": "pics/9.png", "caption": "x"}]
    path = tmp_path / "data" / "list.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records, counter = read_all(str(path))
    assert counter.to_dict()["skipped"] == {"missing_file": 1} and counter.used == 3
    assert [r["caption"] for r in records] == ["zero", "red", "two"]
    assert records[0]["image"].size == (8, 6) and records[1]["key"] == "k1" and records[1]["messages"] == chat
    assert records[2]["attributes"] == {"left": None}
    assert FileDataset(path).caption_lengths() == [4, 0, 3, 1]


def test_csv(tmp_path):
    names = make_images(tmp_path, 3)
    chat = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "from chat"}])
    with (tmp_path / "pairs.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "messages"])
        w.writerow([names[0], "a caption, with a comma", ""])
        w.writerow([names[1], "", chat])
        w.writerow([names[2], "", ""])
        w.writerow([names[2], "", "{broken"])
    records, counter = read_all(str(tmp_path / "pairs.csv"))
    assert [r["caption"] for r in records] == ["a caption, with a comma", "from chat"]
    assert counter.skipped == {"bad_caption_empty": 1, "bad_messages": 1}


def test_csv_with_bad_bytes_skips_only_that_row(tmp_path):
    names = make_images(tmp_path, 2)
    (tmp_path / "p.csv").write_bytes(f"image,caption\n{names[0]},caf\xe9\n".encode("latin-1")
                                     + f"{names[1]},fine\n".encode())
    records, counter = read_all(str(tmp_path / "p.csv"))
    assert [r["caption"] for r in records] == ["fine"] and counter.skipped == {"bad_caption_encoding": 1}


def test_directory_of_splits_and_unknown_spec(tmp_path):
    names = make_images(tmp_path, 2)
    for split, name in zip(("train", "test"), names, strict=True):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"image": name, "caption": split}) + "\n")
    assert read_all(str(tmp_path), split="test")[0][0]["caption"] == "test"
    with pytest.raises(DataSourceError, match="synth"):
        open_dataset(str(tmp_path / "nothing_here" / "x"))
    with pytest.raises(DataSourceError, match="heldout.jsonl"):
        open_dataset(str(tmp_path), split="heldout")


def test_brace_expansion():
    assert expand_braces("s/{00..03}.tar") == ["s/00.tar", "s/01.tar", "s/02.tar", "s/03.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("{x,{y,z}}.tar") == ["x.tar", "y.tar", "z.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_shards("a.tar, b/{0..1}.tar") == ["a.tar", "b/0.tar", "b/1.tar"]


def test_webdataset_dir_list_and_brace_agree(tmp_path):
    made = write_shards(tmp_path / "shards", shards=3, per_shard=4, image_size=32)
    shards = made["shards"]
    specs = [str(tmp_path / "shards"), ",".join(shards), str(tmp_path / "shards" / "{00000..00002}.tar")]
    for spec in specs:
        ds = open_dataset(spec)
        assert isinstance(ds, ShardStream) and ds.shards == shards
        records, counter = read_all(spec)
        assert [r["key"] for r in records] == made["keys"] and counter.skipped == {}
        first = records[0]
        assert first["image"].size == (32, 32) and first["caption"].startswith("a ")
        assert first["attributes"] is not None  # from key.json


def test_webdataset_bad_member_and_bad_shard(tmp_path):
    made = write_shards(tmp_path, shards=2, per_shard=3, bad_member=True)
    cut = tmp_path / "cut.tar"
    data = Path(made["shards"][1]).read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])
    records, counter = read_all(",".join([made["shards"][0], str(cut), str(tmp_path / "missing.tar")]))
    assert counter.skipped == {"truncated": 1, "bad_shard": 2}
    assert [r["key"] for r in records][:2] == made["keys"][:2]
    assert 2 <= len(records) < 5
    with pytest.raises(DataSourceError, match="none of its 3 tar shards"):
        open_dataset(str(tmp_path / "typo" / "{0..2}.tar"))


def test_hf_save_to_disk_and_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = make_images(tmp_path, 3)
    files = [str(tmp_path / n) for n in names]
    ds = datasets.Dataset.from_dict({"image": files, "caption": ["a", "b", ""]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    records, counter = read_all(str(tmp_path / "saved"))
    assert [r["caption"] for r in records] == ["a", "b"] and counter.skipped == {"bad_caption_empty": 1}
    assert np.asarray(records[1]["image"]).shape == (6, 9, 3)
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(read_all(str(tmp_path / "dict"), split="test")[0]) == 1
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (5, 5), (0, 0, 200)).save(folder / f"im{i}.png")
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"im{i}.png", "text": f"blue {i}"}) + "\n" for i in range(2)))
    records, _ = read_all(str(folder))
    assert sorted(r["caption"] for r in records) == ["blue 0", "blue 1"]
    assert records[0]["image"].getpixel((0, 0)) == (0, 0, 200)


def test_hf_without_datasets_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataSourceError, match="pip install datasets"):
        open_dataset("hf:someone/something")
    with pytest.raises(DataSourceError, match="pip install datasets"):
        open_dataset("someone/something")  # not a local path -> a hub id
