#!/usr/bin/env python3
"""The Python baseline that `sft-collate collate` is compared with: HF `tokenizers` `encode_batch` (Rust,
both cores) plus numpy pad/shift/mask, batch by batch, writing the same safetensors files.

    python3 scripts/reference_collate.py INPUT.jsonl TOKENIZER.json TEMPLATE OUTPUT_KEY OUT_DIR [BATCH]

Needs `pip install tokenizers numpy safetensors`. Prints rows, tokens, seconds and tokens/s (tokenizer
loading excluded, as in the CLI's own figure it is included: compare like with like).
"""
import json
import os
import sys
import time

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer


def main():
    path, tok_path, template_path, output_key, out_dir = sys.argv[1:6]
    batch_size = int(sys.argv[6]) if len(sys.argv) > 6 else 64
    started = time.perf_counter()
    tok = Tokenizer.from_file(tok_path)
    pad = tok.token_to_id("<|endoftext|>")
    template = open(template_path).read()
    rows = [json.loads(line) for line in open(path) if line.strip()]
    os.makedirs(out_dir, exist_ok=True)
    tokens = 0
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        prompts = [template.replace("{question}", r["question"]) for r in chunk]
        outputs = [r[output_key] for r in chunk]
        enc = tok.encode_batch(prompts + outputs, add_special_tokens=False)
        p_ids = [e.ids for e in enc[: len(chunk)]]
        o_ids = [e.ids for e in enc[len(chunk) :]]
        seqs = [p + o for p, o in zip(p_ids, o_ids)]
        L = max(len(s) for s in seqs)
        padded = np.full((len(seqs), L), pad, dtype=np.int32)
        mask = np.zeros((len(seqs), L - 1), dtype=bool)
        for i, (p, s) in enumerate(zip(p_ids, seqs)):
            padded[i, : len(s)] = s
            mask[i, max(len(p), 1) - 1 : len(s) - 1] = True
            tokens += len(s)
        save_file(
            {"input_ids": np.ascontiguousarray(padded[:, :-1]), "labels": np.ascontiguousarray(padded[:, 1:]), "response_mask": mask},
            os.path.join(out_dir, f"batch-{b:05d}.safetensors"),
        )
    secs = time.perf_counter() - started
    print(json.dumps({"rows": len(rows), "tokens": tokens, "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs)}))


if __name__ == "__main__":
    main()
