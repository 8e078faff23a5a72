"""The sharded ``tokenize`` under a real distributed engine: a Ray Data job (a local Ray cluster) runs one
task per shard, and the store it writes equals the store one process writes — the same Arrow rows, the
same loader batches."""

import json

import pytest

import sft_collate

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[data]')")
pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
import pyarrow.ipc  # noqa: E402
import ray.data  # noqa: E402

SHARDS = 4
MESSAGE_TEMPLATE = "{role}: {content}\n"


def rows_of(store):
    tables = [pyarrow.ipc.open_file(pa.memory_map(str(p))).read_all() for p in sorted(store.glob("*.arrow"))]
    rows = pa.concat_tables(tables).to_pylist()
    return sorted(rows, key=lambda r: r["source_row"])


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_a_ray_data_job_writes_the_store_one_process_writes(tmp_path, local_cluster):
    rows = [{"prompt": f"Question {i}:" + " more" * (i % 9), "output": f" answer {i * 7}."} for i in range(250)]
    for i in range(0, 250, 25):
        rows[i] = {"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello!"}]}
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))

    one = tmp_path / "one"
    sft_collate.tokenize_to_store(source, one, "cl100k_base", message_template=MESSAGE_TEMPLATE)

    def tokenize_shard(task):
        # Runs in a Ray worker process (shipped by value: workers cannot import this test module): one
        # shard of the input, written beside the others.
        manifest = sft_collate.tokenize_to_store(
            task["input"], task["store"], "cl100k_base", shard=(task["shard"], task["count"]), message_template=MESSAGE_TEMPLATE
        )
        return {"shard": task["shard"], "rows": manifest["rows"]}

    sharded = tmp_path / "sharded"
    tasks = [{"input": str(source), "store": str(sharded), "shard": i, "count": SHARDS} for i in range(SHARDS)]
    done = ray.data.from_items(tasks).map(tokenize_shard).take_all()
    assert sorted(d["shard"] for d in done) == list(range(SHARDS))
    assert sum(d["rows"] for d in done) == len(rows)

    assert rows_of(sharded) == rows_of(one)
    # The loader reads both as the same rows: the same steps, in the same order.
    steps = [
        [step["input_ids"].tolist() for step in sft_collate.Loader(store, batch_rows=16, shuffle=False)]
        for store in (one, sharded)
    ]
    assert steps[0] == steps[1] and len(steps[0]) == 16
