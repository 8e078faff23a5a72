"""The token store from Python: written by shards, read back as Arrow tables by pyarrow (what HF datasets,
Polars and DuckDB read), the rows equal to the tokenizer's own encodings."""

import json

import pytest

import sft_collate

pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
import pyarrow.ipc  # noqa: E402
import pyarrow.parquet  # noqa: E402,F401


def test_a_sharded_store_reads_back_as_arrow(tmp_path):
    rows = [{"prompt": f"What is {i}+{i}?", "output": f" {2 * i}."} for i in range(10)]
    rows.insert(4, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    manifests = [
        sft_collate.tokenize_to_store(source, store, "cl100k_base", shard=(i, 3), message_template="{role}: {content}\n")
        for i in range(3)
    ]
    assert sum(m["rows"] for m in manifests) == len(rows)
    tokenizer = sft_collate.Tokenizer("cl100k_base")
    seen = {}
    for m in manifests:
        table = pyarrow.ipc.open_file(pa.memory_map(str(store / m["file"]))).read_all()
        assert table.schema.field("input_ids").type == pa.list_(pa.field("item", pa.uint32(), nullable=False))
        assert table.schema.field("source_row").type == pa.uint64()
        for r in table.to_pylist():
            seen[r["source_row"]] = r
    assert sorted(seen) == list(range(len(rows)))
    for line, row in enumerate(rows):
        got = seen[line]
        if "prompt" in row:
            prompt, output = tokenizer.encode(row["prompt"]), tokenizer.encode(row["output"])
            assert got["input_ids"] == prompt + output
            assert got["prompt_len"] == len(prompt) and got["trainable"] is None
        else:
            parts = [("user: ", False), ("Hi\n", False), ("assistant: ", False), ("Hello!\n", True)]
            ids = [tokenizer.encode(t) for t, _ in parts]
            assert got["input_ids"] == sum(ids, [])
            assert got["trainable"] == sum(([f] * len(i) for (_, f), i in zip(parts, ids)), [])
    with pytest.raises(ValueError, match="overwrite"):
        sft_collate.tokenize_to_store(source, store, "cl100k_base", shard=(0, 3))


def test_the_loader_gives_every_row_once_per_epoch_on_every_rank(tmp_path):
    rows = [{"prompt": f"Question {i}" + " and more" * (i % 5), "output": f" answer {i}."} for i in range(23)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    sft_collate.tokenize_to_store(source, store, "cl100k_base")
    for kind in ({"batch_rows": 4}, {"batch_tokens": 40}, {"pack_tokens": 32, "overflow": "split"}):
        seen = []
        lengths = set()
        for rank in range(3):
            loader = sft_collate.Loader(store, world_size=3, rank=rank, seed=1, labels="ignore_index", **kind)
            lengths.add(len(loader))
            steps = list(loader)
            assert len(steps) == len(loader) and [s["step"] for s in steps] == list(range(len(loader)))
            for s in steps:
                seen += s["rows"]
                assert s["input_ids"].shape == s["labels"].shape == s["response_mask"].shape
                if "cu_seqlens" in s:
                    assert s["input_ids"].shape[1] <= 32
            assert loader.state_dict() == {"epoch": 1, "step": 0}
            # Resume mid-epoch: the same steps from there.
            again = sft_collate.Loader(store, world_size=3, rank=rank, seed=1, labels="ignore_index", **kind)
            again.load_state_dict({"epoch": 0, "step": 1})
            for want, got in zip(steps[1:], again):
                assert got["rows"] == want["rows"] and (got["input_ids"] == want["input_ids"]).all()
        assert len(lengths) == 1
        if "pack_tokens" in kind:
            assert sorted(set(seen)) == list(range(len(rows)))  # split rows appear once per piece
        else:
            assert sorted(seen) == list(range(len(rows)))


def test_the_loader_and_the_store_name_bad_arguments(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a", "output": "b"}\n' * 4)
    store = tmp_path / "store"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sft_collate.tokenize_to_store(tmp_path / "nope.jsonl", store, "cl100k_base")
    assert not store.exists() or not any(store.iterdir()), "a failed shard leaves nothing in the store"
    with pytest.raises(ValueError, match=r"shard\[0\]=-1: must be at least 0"):
        sft_collate.tokenize_to_store(source, store, "cl100k_base", shard=(-1, 2))
    sft_collate.tokenize_to_store(source, store, "cl100k_base")
    with pytest.raises(ValueError, match=r"batch_rows=-1: must be at least 0"):
        sft_collate.Loader(store, batch_rows=-1)
    with pytest.raises(ValueError, match=r"seed=-3: must be in"):
        sft_collate.Loader(store, batch_rows=2, seed=-3)
    with pytest.raises(ValueError, match="invalid option world_size: must be at least 1"):
        sft_collate.Loader(store, batch_rows=2, world_size=0)
    with pytest.raises(ValueError, match="invalid option rank: 2 is not a rank of a world of 2"):
        sft_collate.Loader(store, batch_rows=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"pack_size=-5: must be at least 0"):
        sft_collate.export_megatron(store, tmp_path / "megatron", -5)


def test_the_megatron_export_reads_back_as_megatron_bridge_collates_it(tmp_path):
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Question {i}:" + " and more" * (i % 6), "output": f" answer {i}" + "!" * (i % 3)} for i in range(40)]
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    sft_collate.tokenize_to_store(source, store, "cl100k_base", message_template="{role}: {content}\n")
    out = tmp_path / "megatron"
    summary = sft_collate.export_megatron(store, out, 48, packs_per_file=3)
    assert summary["documents"] == len(rows)
    meta = json.loads((out / "pack_metadata.json").read_text())
    assert meta[0]["pack_size"] == 48 and meta[0]["max_samples_per_bin"] == summary["max_samples_per_bin"]

    # GPTSFTPackedDataset.collate_fn and _build_loss_mask (answer_only_loss), per document.
    got = []
    files = sorted(out.glob("*.idx.parquet"))
    assert len(files) == summary["packs"] // 3 + (summary["packs"] % 3 > 0)
    for path in files:
        table = pq.read_table(path)
        assert table.schema.field("input_ids").type == pa.list_(pa.int32())
        assert table.schema.field("loss_mask").type == pa.list_(pa.int8())
        assert table.schema.field("seq_start_id").type == pa.list_(pa.int32())
        for pack in table.to_pylist():
            ids, mask = pack["input_ids"], pack["loss_mask"]
            bounds = pack["seq_start_id"] + [len(ids)]
            assert sum(e - s - 1 for s, e in zip(bounds, bounds[1:])) <= 48
            for s, e in zip(bounds, bounds[1:]):
                got.append((tuple(ids[s : e - 1]), tuple(ids[s + 1 : e]), tuple(bool(m) for m in mask[s : e - 1])))

    # The same documents from this package's CS336 collation (one row at a time, no padding).
    tokenizer = sft_collate.Tokenizer("cl100k_base")
    want = []
    for row in rows[:-1]:
        b = sft_collate.tokenize_prompt_and_output([row["prompt"]], [row["output"]], tokenizer)
        want.append((tuple(b["input_ids"][0].tolist()), tuple(b["labels"][0].tolist()), tuple(b["response_mask"][0].tolist())))
    parts = [("user: ", False), ("Hi\n", False), ("assistant: ", False), ("Hello!\n", True)]
    ids = [tokenizer.encode(t) for t, _ in parts]
    tokens = sum(ids, [])
    trained = sum(([f] * len(i) for (_, f), i in zip(parts, ids)), [])
    want.append((tuple(tokens[:-1]), tuple(tokens[1:]), tuple(trained[1:])))
    assert sorted(got) == sorted(want)


def _store_rows(store):
    """Every row of a store's shards, by source row."""
    rows = {}
    for path in sorted(store.glob("*.arrow")):
        for r in pyarrow.ipc.open_file(pa.memory_map(str(path))).read_all().to_pylist():
            rows[r["source_row"]] = (r["input_ids"], r["prompt_len"], r["trainable"])
    return rows


def test_hugging_face_datasets_files_are_read_as_they_are(shared, qwen2_path, tmp_path, monkeypatch):
    """A dataset as `datasets` writes it (`to_parquet`, the directory of Arrow stream files of
    `save_to_disk`, `to_json` as one array and gzip-compressed) tokenizes to the same store as its
    JSONL; so do conversations in a table."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything here is local
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install datasets)")
    jsonl = shared / "fixtures/gsm8k/train.jsonl"
    template = (shared / "fixtures/gsm8k/r1_zero.prompt").read_text()
    ds = datasets.Dataset.from_json(str(jsonl), cache_dir=str(tmp_path / "cache"))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)  # a directory of Arrow stream files
    ds.to_json(str(tmp_path / "train.json"), lines=False, batch_size=len(ds))  # one JSON array
    ds.to_json(str(tmp_path / "train.jsonl.gz"), compression="gzip")
    saved = tmp_path / "saved"
    assert len(list(saved.glob("*.arrow"))) == 3
    options = dict(template=template, output_key="answer")
    want = _store_rows_of(jsonl, qwen2_path, tmp_path / "from-jsonl", options)
    assert len(want) == 7473
    for source in (tmp_path / "train.parquet", saved, tmp_path / "train.json", tmp_path / "train.jsonl.gz"):
        assert _store_rows_of(source, qwen2_path, tmp_path / ("store-" + source.name), options) == want, source

    chat = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    datasets.Dataset.from_list(chat).to_parquet(str(tmp_path / "chat.parquet"))
    options = dict(message_template="<|im_start|>{role}\n{content}<|im_end|>\n")
    want = _store_rows_of(tmp_path / "chat.jsonl", qwen2_path, tmp_path / "chat-jsonl", options)
    assert _store_rows_of(tmp_path / "chat.parquet", qwen2_path, tmp_path / "chat-parquet", options) == want
    # ShareGPT's spelling, as one JSON array: the same rows.
    names = {"user": "human", "assistant": "gpt"}
    sharegpt = [{"conversations": [{"from": names.get(m["role"], m["role"]), "value": m["content"]}
                                   for m in r["messages"]]} for r in chat]
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt, indent=2))
    options.update(messages_key="conversations", role_key="from", content_key="value",
                   role_names={"human": "user", "gpt": "assistant"})
    assert _store_rows_of(tmp_path / "sharegpt.json", qwen2_path, tmp_path / "sharegpt", options) == want

    # A table without the columns asked for names the ones it has.
    with pytest.raises(ValueError, match=r'no column "prompt" \(the prompt key\).*its columns are "question", "answer"'):
        sft_collate.tokenize_to_store(tmp_path / "train.parquet", tmp_path / "none", qwen2_path)


def _store_rows_of(source, tokenizer, store, options):
    for i in range(2):
        sft_collate.tokenize_to_store(source, store, tokenizer, shard=(i, 2), **options)
    return _store_rows(store)
