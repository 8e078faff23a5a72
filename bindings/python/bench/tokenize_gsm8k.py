"""tokenize_prompt_and_output on GSM8K train (r1_zero template, Qwen2 tokenizer) from Python: sft_collate
against the plain Hugging Face tokenizers + torch implementation CS336 students write, same texts, same
process, alternating runs. Prints each run's time and the median ratio.

    python bench/tokenize_gsm8k.py [--shared ../../shared] [--runs 5] [--batch 64] [--device cpu|cuda]
"""

import argparse
import json
import os
import pathlib
import statistics
import time

import torch
from tokenizers import Tokenizer

import sft_collate


def reference(prompts, outputs, hf, pad_id):
    """What a student writes: encode each text, concatenate, pad, shift, mask (the prompt_len - 1 rule)."""
    prompt_ids = [e.ids for e in hf.encode_batch(prompts, add_special_tokens=False)]
    output_ids = [e.ids for e in hf.encode_batch(outputs, add_special_tokens=False)]
    seqs = [p + o for p, o in zip(prompt_ids, output_ids)]
    longest = max(len(s) for s in seqs)
    padded = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest - 1), dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, prompt_ids)):
        padded[i, : len(s)] = torch.tensor(s)
        mask[i, max(len(p) - 1, 0) : len(s) - 1] = True
    return {"input_ids": padded[:, :-1], "labels": padded[:, 1:], "response_mask": mask}


def main():
    here = pathlib.Path(__file__).resolve()
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=os.environ.get("SFT_COLLATE_SHARED", str(here.parents[4] / "shared")))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    fixtures = pathlib.Path(args.shared) / "fixtures"
    template = (fixtures / "gsm8k/r1_zero.prompt").read_text()
    rows = [json.loads(line) for line in (fixtures / "gsm8k/train.jsonl").read_text().splitlines() if line.strip()]
    prompts = [template.replace("{question}", r["question"]) for r in rows]
    outputs = [r["answer"] for r in rows]
    path = str(fixtures / "qwen2/tokenizer.json")
    hf = Tokenizer.from_file(path)
    ours = sft_collate.Tokenizer(path)
    batches = [(prompts[i : i + args.batch], outputs[i : i + args.batch]) for i in range(0, len(rows), args.batch)]

    def run_ours():
        tokens = 0
        for p, o in batches:
            b = sft_collate.tokenize_prompt_and_output(p, o, ours, device=args.device)
            tokens += int(b["input_ids"].numel())
        if args.device == "cuda":
            torch.cuda.synchronize()
        return tokens

    def run_reference():
        tokens = 0
        for p, o in batches:
            b = reference(p, o, hf, 151643)
            if args.device == "cuda":
                b = {k: v.to("cuda", non_blocking=True) for k, v in b.items()}
            tokens += int(b["input_ids"].numel())
        if args.device == "cuda":
            torch.cuda.synchronize()
        return tokens

    # Same tensors, checked once.
    p, o = batches[0]
    a, b = sft_collate.tokenize_prompt_and_output(p, o, ours), reference(p, o, hf, 151643)
    assert all(torch.equal(a[k], b[k]) for k in b), "the two implementations disagree"
    times = {"sft_collate": [], "reference": []}
    for _ in range(args.runs):
        for name, fn in (("sft_collate", run_ours), ("reference", run_reference)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    cores = os.cpu_count()
    print(f"GSM8K train: {len(rows)} rows in batches of {args.batch}, device {args.device}, {cores} cores, torch {torch.__version__}")
    for name, ts in times.items():
        print(f"{name:>12}: " + " ".join(f"{t * 1e3:.0f}" for t in ts) + f" ms (median {statistics.median(ts) * 1e3:.0f} ms)")
    ratio = statistics.median(times["reference"]) / statistics.median(times["sft_collate"])
    print(f"speed-up: {ratio:.1f}x")


if __name__ == "__main__":
    main()
