"""Collation against a plain PyTorch + Hugging Face tokenizers implementation of CS336's semantics,
written here, and against CS336's own vectors."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DEVICES, needs_cuda

import sft_collate

tokenizers = pytest.importorskip("tokenizers")


def reference(prompts, outputs, hf, pad_id, pad_to_multiple_of=None, ignore_index=None):
    """CS336's tokenize_prompt_and_output, as students write it."""
    seqs, prompt_lens = [], []
    for p, o in zip(prompts, outputs):
        pi = hf.encode(p, add_special_tokens=False).ids
        oi = hf.encode(o, add_special_tokens=False).ids
        seqs.append(pi + oi)
        prompt_lens.append(len(pi))
    width = max(len(s) for s in seqs) - 1
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    padded = torch.full((len(seqs), width + 1), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
        for j in range(width):
            mask[i, j] = prompt_lens[i] <= j + 1 < len(s)
    labels = padded[:, 1:].clone()
    if ignore_index is not None:
        labels[~mask] = ignore_index
    return {"input_ids": padded[:, :-1], "labels": labels, "response_mask": mask}


def gsm8k_rows(shared, n=300):
    template = (shared / "fixtures/gsm8k/r1_zero.prompt").read_text()
    rows = [json.loads(l) for l in (shared / "fixtures/gsm8k/train.jsonl").read_text().splitlines()[:n]]
    return [template.replace("{question}", r["question"]) for r in rows], [r["answer"] for r in rows]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{}, {"pad_to_multiple_of": 8, "ignore_index": -100}])
def test_matches_the_reference_on_gsm8k(shared, qwen2_path, device, options):
    prompts, outputs = gsm8k_rows(shared)
    hf = tokenizers.Tokenizer.from_file(qwen2_path)
    want = reference(prompts, outputs, hf, 151643, **options)
    got = sft_collate.tokenize_prompt_and_output(
        prompts,
        outputs,
        qwen2_path,
        device=device,
        pad_to_multiple_of=options.get("pad_to_multiple_of"),
        labels="ignore_index" if "ignore_index" in options else "pad",
    )
    for name, tensor in want.items():
        assert got[name].device.type == device
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].cpu(), tensor), name


def test_random_text_and_every_tokenizer_form(qwen2_path):
    rng = random.Random(7)
    alphabet = "ab cé東京\n\t 12,345 <|im_start|> 😀"
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(50)]
    outputs = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(50)]
    hf = tokenizers.Tokenizer.from_file(qwen2_path)
    want = reference(prompts, outputs, hf, 151643)
    for form in (qwen2_path, hf, sft_collate.Tokenizer(qwen2_path)):
        got = sft_collate.tokenize_prompt_and_output(prompts, outputs, form, pad_id=151643)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (type(form), name)


def test_the_load_cache_gives_the_same_tokenizer(qwen2_path, tmp_path, monkeypatch):
    """A tokenizer.json read back from the load cache ($SFT_COLLATE_CACHE) encodes as the file does."""
    monkeypatch.setenv("SFT_COLLATE_CACHE", str(tmp_path))
    first = sft_collate.Tokenizer(qwen2_path)
    assert first.load_cache.startswith("prepared and saved to " + str(tmp_path))
    second = sft_collate.Tokenizer(qwen2_path)
    assert second.load_cache.startswith("read from " + str(tmp_path))
    hf = tokenizers.Tokenizer.from_file(qwen2_path)
    texts = ["Hello, world!", "  spaces\n\nand 12345 東京 😀", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        want = hf.encode(text, add_special_tokens=False).ids
        assert first.encode(text) == want and second.encode(text) == want, text
    assert second.vocab_size == first.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    monkeypatch.setenv("SFT_COLLATE_CACHE", "off")
    assert sft_collate.Tokenizer(qwen2_path).load_cache == "off"
    assert sft_collate.Tokenizer("o200k_base").load_cache is None


def test_builtins_as_tokenizer_json():
    """A built-in written as a tokenizer.json loads in `tokenizers` and gives the built-in's ids."""
    texts = ["Hello, world!", "  spaces\n\nand 12345 東京 😀", "don't <|endoftext|> x"]
    for name in sft_collate.BUILTIN_TOKENIZERS:
        builtin = sft_collate.Tokenizer(name)
        hf = tokenizers.Tokenizer.from_str(builtin.to_json())
        for text in texts:
            assert hf.encode(text, add_special_tokens=False).ids == builtin.encode(text), (name, text)


def test_transformers_tokenizer_and_its_pad_id(qwen2_path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=qwen2_path, pad_token="<|im_end|>")
    got = sft_collate.tokenize_prompt_and_output(["a"], ["b c d"], tok)
    assert got["input_ids"].shape[1] >= 1
    assert int(got["labels"][0, -1]) != 151645 or got["response_mask"][0, -1]


def test_cs336_vectors(fixture_json, qwen2_path):
    fx = fixture_json("cs336/tokenize_prompt_and_output.json")
    got = sft_collate.cs336.tokenize_prompt_and_output(fx["prompt_strs"], fx["output_strs"], qwen2_path)
    assert got["input_ids"].tolist() == fx["input_ids"]
    assert got["labels"].tolist() == fx["labels"]
    assert got["response_mask"].tolist() == fx["response_mask"]
    assert got["input_ids"].dtype == torch.int64 and got["response_mask"].dtype == torch.bool


def test_options_and_bad_input():
    got = sft_collate.tokenize_prompt_and_output(
        ["a b c d e f"], ["g h"], "o200k_base", max_len=4, truncation="prompt-left", dtype=torch.int32
    )
    assert got["input_ids"].shape == (1, 3) and got["input_ids"].dtype == torch.int32
    with pytest.raises(ValueError, match="exceed max_len 4"):
        sft_collate.tokenize_prompt_and_output(["a b c d e f"], ["g h"], "o200k_base", max_len=4)
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        sft_collate.tokenize_prompt_and_output(["a", "b"], ["c"], "o200k_base")
    with pytest.raises(ValueError, match='invalid option truncation: "sideways" is not one of'):
        sft_collate.tokenize_prompt_and_output(["a"], ["b"], "o200k_base", truncation="sideways")
    with pytest.raises(ValueError):
        sft_collate.tokenize_prompt_and_output(["a"], ["b"], "no-such-tokenizer")
    with pytest.raises(ValueError, match="labels="):
        sft_collate.tokenize_prompt_and_output(["a"], ["b"], "o200k_base", labels="nope")
    with pytest.raises(TypeError):
        sft_collate.tokenize_prompt_and_output(["a"], ["b"], 42)


def test_flat_batches_hold_each_texts_ids():
    """``encode_batch_flat``: one uint32 array and its int64 offsets, the same ids as ``encode_batch``."""
    tokenizer = sft_collate.Tokenizer("o200k_base")
    texts = ["", "Hello, world!", "naïve café 東京 12345", "", "<|endoftext|> is text here"]
    ids, offsets = tokenizer.encode_batch_flat(texts)
    assert ids.dtype == np.uint32 and offsets.dtype == np.int64
    assert offsets.tolist()[0] == 0 and offsets[-1] == len(ids) and len(offsets) == len(texts) + 1
    want = tokenizer.encode_batch(texts)
    assert [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))] == want
    ids[:1] = 7  # writable: the caller owns the buffer
    empty_ids, empty_offsets = tokenizer.encode_batch_flat([])
    assert len(empty_ids) == 0 and empty_offsets.tolist() == [0]
    with pytest.raises(TypeError):
        tokenizer.encode_batch_flat("one string")


def test_arguments_that_cannot_mean_anything_are_named():
    """A string where a list of strings belongs (each character would be a row), a count below 0 or a
    float, a pad id outside u32, a conversation given as one dict: each refused with its parameter named,
    not an overflow from the native call or a batch of characters."""
    tpo = sft_collate.tokenize_prompt_and_output
    with pytest.raises(TypeError, match=r"prompt_strs: expected a list of strings, got one str \(wrap it"):
        tpo("What is 2+2?", "4", "o200k_base")
    with pytest.raises(TypeError, match="output_strs: expected a list of strings, got one bytes"):
        tpo(["a"], b"4", "o200k_base")
    with pytest.raises(ValueError, match=r"max_len=-1: must be at least 0"):
        tpo(["a"], ["b"], "o200k_base", max_len=-1)
    with pytest.raises(ValueError, match="invalid option max_len: must be at least 1"):
        tpo(["a"], ["b"], "o200k_base", max_len=0)
    with pytest.raises(TypeError, match=r"max_len=2.5: expected an int"):
        tpo(["a"], ["b"], "o200k_base", max_len=2.5)
    with pytest.raises(ValueError, match=r"pad_to_multiple_of=-8: must be at least 0"):
        tpo(["a"], ["b"], "o200k_base", pad_to_multiple_of=-8)
    for pad_id in (-1, 2**32):
        with pytest.raises(ValueError, match=rf"pad_id={pad_id}: must be in \[0, 4294967296\)"):
            tpo(["a"], ["b"], "o200k_base", pad_id=pad_id)
    with pytest.raises(ValueError, match=r"max_tokens=-1: must be at least 0"):
        sft_collate.pack(["a"], ["b"], "o200k_base", -1)
    with pytest.raises(TypeError, match="prompt_strs: expected a list of strings"):
        sft_collate.pack("a", ["b"], "o200k_base", 64)
    message = {"role": "user", "content": "hi"}
    with pytest.raises(TypeError, match="conversations: expected a list of conversations"):
        sft_collate.tokenize_conversations("hi", "o200k_base")
    with pytest.raises(TypeError, match="conversation 0: expected a list of messages"):
        sft_collate.tokenize_conversations([message], "o200k_base")
    with pytest.raises(TypeError, match="train_roles: expected a list of strings"):
        sft_collate.tokenize_conversations([[message]], "o200k_base", train_roles="assistant")
    with pytest.raises(ValueError, match=r"seed=-1: must be in \[0, 18446744073709551616\)"):
        sft_collate.bucket_order([3, 1, 2], 2, seed=-1)
    with pytest.raises(ValueError, match=r"window=-1: must be at least 0"):
        sft_collate.bucket_order([3, 1, 2], -1)
    # numpy integers are ints.
    got = tpo(["a"], ["b"], "o200k_base", max_len=np.int64(8), pad_id=np.uint32(0))
    assert got["input_ids"].shape[0] == 1


def test_conversations_pack_and_buckets():
    conversations = [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}],
    ]
    got = sft_collate.tokenize_conversations(
        conversations, "o200k_base", message_template="<|{role}|>{content}\n", labels="ignore_index"
    )
    assert got["input_ids"].shape[0] == 2
    assert bool(got["response_mask"].any())
    assert torch.all(got["labels"][~got["response_mask"]] == -100)
    # The same conversations as ShareGPT spells them: the same tensors.
    names = {"user": "human", "assistant": "gpt"}
    sharegpt = [[{"from": names.get(m["role"], m["role"]), "value": m["content"]} for m in c] for c in conversations]
    same = sft_collate.tokenize_conversations(
        sharegpt, "o200k_base", message_template="<|{role}|>{content}\n", labels="ignore_index",
        role_key="from", content_key="value", role_names={"human": "user", "gpt": "assistant"},
    )
    for key in got:
        assert torch.equal(got[key], same[key]), key
    with pytest.raises(ValueError, match=r'missing key "from"'):
        sft_collate.tokenize_conversations(conversations, "o200k_base", role_key="from")
    with pytest.raises(TypeError, match="role_names must be a dict"):
        sft_collate.tokenize_conversations(sharegpt, "o200k_base", role_names=[("human", "user")])
    packs = sft_collate.pack(["a b c", "d", "e f g h"], ["x", "y z", "w"], "o200k_base", 8)
    rows = sorted(r for p in packs for r in p["rows"])
    assert rows == [0, 1, 2]
    for p in packs:
        t = p["input_ids"].shape[1]
        assert p["cu_seqlens"][0] == 0 and p["cu_seqlens"][-1] == t and p["cu_seqlens"].dtype == torch.int32
        assert p["max_seqlen"] <= 8
    order = sft_collate.bucket_order([5, 1, 4, 2, 3], window=5, seed=1)
    assert sorted(order) == [0, 1, 2, 3, 4]


def test_numpy_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, sft_collate\n"
        "b = sft_collate.tokenize_prompt_and_output(['Hi'], ['there'], 'o200k_base')\n"
        "assert isinstance(b['input_ids'], np.ndarray) and b['response_mask'].dtype == np.bool_\n"
        "print(b['input_ids'].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@needs_cuda
def test_cuda_results_stay_on_the_current_stream():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = sft_collate.tokenize_prompt_and_output(["Hello,"] * 8, [" world!"] * 8, "o200k_base", device="cuda")
    stream.synchronize()
    want = sft_collate.tokenize_prompt_and_output(["Hello,"] * 8, [" world!"] * 8, "o200k_base")
    for name in want:
        assert torch.equal(got[name].cpu(), want[name])
