"""The token store from Python: written by shards, read back as Arrow tables by pyarrow (what HF datasets,
Polars and DuckDB read), the rows equal to the tokenizer's own encodings."""

import json

import pytest

import sft_collate

pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
import pyarrow.ipc  # noqa: E402


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
