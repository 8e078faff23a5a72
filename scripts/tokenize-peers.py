"""The peers of `benches/tokenize.rs`, on the same texts, one thread: Hugging Face `tokenizers`
(`encode_batch_fast` with its parallelism off) and gigatoken (its fastest path,
`encode_batch(BytesSource(buffer, separator), parallel=False)`), with whether each gives the ids
`tokenizers` gives. Run it beside `cargo bench --bench tokenize -- one_thread` and compare in the same
window (this machine's speed varies between windows; ratios within a run hold).

    python scripts/tokenize-peers.py [--shared ../shared] [--tokenizer o200k_base]

`--tokenizer` is a `tokenizer.json` path (default: the Qwen2 fixture) or a built-in name (o200k_base,
cl100k_base), which the `sft_collate` package writes as a `tokenizer.json` (`Tokenizer.to_json()`) so that
every engine runs the same vocabulary. Needs `tokenizers`; gigatoken (`pip install gigatoken`) is
measured when installed.
"""

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from tokenizers import Tokenizer  # noqa: E402


def corpus(shared: pathlib.Path) -> list:
    """Every prompt (r1_zero template) and every answer of GSM8K train, as the bench encodes them."""
    template = (shared / "fixtures/gsm8k/r1_zero.prompt").read_text()
    texts = []
    for line in (shared / "fixtures/gsm8k/train.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(template.replace("{question}", row["question"]))
            texts.append(row["answer"])
    return texts


def timed(f, runs: int = 7):
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    default = os.environ.get("SFT_COLLATE_SHARED", str(pathlib.Path(__file__).parent.parent.parent / "shared"))
    parser.add_argument("--shared", default=default)
    parser.add_argument("--tokenizer", help="a tokenizer.json path or a built-in name (default: Qwen2)")
    args = parser.parse_args()
    shared = pathlib.Path(args.shared)
    texts = corpus(shared)
    size = sum(len(t.encode()) for t in texts)
    source = args.tokenizer or str(shared / "fixtures/qwen2/tokenizer.json")
    if pathlib.Path(source).is_file():
        hf, label = Tokenizer.from_file(source), "Qwen2" if args.tokenizer is None else source
    else:
        import sft_collate

        hf, label = Tokenizer.from_str(sft_collate.Tokenizer(source).to_json()), source
    want = [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)]
    tokens = sum(map(len, want))
    print(f"GSM8K train, {label}: {len(texts)} texts, {size / 1e6:.2f} MB, {tokens} tokens; one thread")

    def report(name, best, median, same):
        print(
            f"{name:>12}: best {best * 1e3:8.1f} ms, median {median * 1e3:8.1f} ms, "
            f"{size / best / 1e6:6.0f} MB/s, {tokens / best / 1e6:5.1f}M tokens/s; "
            f"ids as tokenizers: {same}/{len(want)}"
        )

    best, median, out = timed(lambda: hf.encode_batch_fast(texts, add_special_tokens=False), runs=3)
    report("tokenizers", best, median, sum(e.ids == w for e, w in zip(out, want)))
    try:
        import gigatoken
    except ImportError:
        print("   gigatoken: not installed (pip install gigatoken)")
        return
    fast = gigatoken.Tokenizer(hf)
    separator = b"\0"
    buffer = separator.join(t.encode() for t in texts)
    best, median, out = timed(
        lambda: fast.encode_batch(gigatoken.BytesSource([buffer], separator=separator), parallel=False)
    )
    got = out.tolist()
    report("gigatoken", best, median, sum(list(g) == w for g, w in zip(got, want)))


if __name__ == "__main__":
    main()
