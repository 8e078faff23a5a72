"""Build the SentencePiece-style BPE tokenizer.json files under tests/data/spm/.

Hub files of Llama 2, Mistral 7B, TinyLlama, Gemma and most other non-byte-level BPE models are
SentencePiece BPE models (characters merged, unknown characters as `<0xNN>` byte tokens) converted by
`transformers`' converters. Those files are large and some are under licences that forbid copying, so the
tests use small ones made the same way: a SentencePiece BPE model trained with Llama 2's trainer settings
on this repository's own text, then written out as each converter writes it:

- `llama-legacy.json`: `LlamaConverter` with `legacy=True` (Llama 2, Mistral 7B v0.1, TinyLlama): normalizer
  `Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer.
- `llama.json`: `LlamaConverter` with `legacy=False` (newer conversions): no normalizer,
  `Metaspace(prepend_scheme="first", split=False)`.
- `gemma.json`: `GemmaConverter`: normalizer `Replace(" ", "▁")`, pre-tokenizer `Split(" ",
  merged_with_previous)`; trained with `split_by_whitespace=False`, so pieces span spaces ("▁of▁the") and
  merges cross the `▁` boundaries the fast engine would otherwise cut at.

The vocabulary, merges (every split of a piece into two pieces, ranked by the piece's score) and added
tokens follow the converters (transformers 4.4x, `convert_slow_tokenizer.py`). Run from the repository
root: `python scripts/make-spm-fixtures.py` (needs `sentencepiece` and `tokenizers`).
"""

import io
import pathlib
import subprocess

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "spm"

# Text in other scripts, so that the vocabulary has multi-byte characters and the tests reach both the
# characters it has and those that fall back to bytes.
MULTILINGUAL = """\
Le tokenizer découpe le texte en morceaux ; chaque morceau reçoit un identifiant.
Der Tokenizer zerlegt den Text in Stücke; jedes Stück bekommt eine Kennung.
El tokenizador divide el texto en piezas y cada pieza recibe un número.
Токенизатор делит текст на части, и каждая часть получает номер.
トークナイザーはテキストを小さな断片に分け、それぞれに番号を付けます。
分词器把文本切成小块，每一块得到一个编号。
토크나이저는 텍스트를 조각으로 나누고 각 조각에 번호를 붙입니다.
Ο αναλυτής χωρίζει το κείμενο σε κομμάτια και δίνει σε καθένα έναν αριθμό.
"""


def corpus() -> str:
    files = subprocess.run(
        ["git", "ls-files", "*.md", "*.rs", "*.py", "*.cu", "*.cuh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    text = "".join((ROOT / f).read_text(encoding="utf-8") for f in sorted(files))
    return text + MULTILINGUAL * 20


def train(split_by_whitespace: bool) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    lines = [line for line in corpus().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        # Llama 2's trainer settings, a smaller vocabulary.
        model_type="bpe",
        vocab_size=3000,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=0.9995,
        split_by_whitespace=split_by_whitespace,
        max_sentence_length=16384,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def model(sp: spm.SentencePieceProcessor) -> Tokenizer:
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    ranked = []
    for piece, rank in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((sp.get_score(rank), rank, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked, key=lambda m: (-m[0], m[1]))]
    tokenizer = Tokenizer(
        BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tokenizer.add_tokens(
        [
            AddedToken(sp.id_to_piece(i), normalized=False, special=True)
            for i in range(sp.get_piece_size())
            if sp.is_control(i) or sp.is_unknown(i)
        ]
    )
    return tokenizer


def llama(sp: spm.SentencePieceProcessor, legacy: bool) -> Tokenizer:
    tokenizer = model(sp)
    if legacy:
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(prepend="▁"), normalizers.Replace(pattern=" ", content="▁")]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=False
        )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tokenizer


def gemma(sp: spm.SentencePieceProcessor) -> Tokenizer:
    tokenizer = model(sp)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    words = train(split_by_whitespace=True)
    spans = train(split_by_whitespace=False)
    for name, tokenizer in [
        ("llama-legacy", llama(words, legacy=True)),
        ("llama", llama(words, legacy=False)),
        ("gemma", gemma(spans)),
    ]:
        tokenizer.save(str(OUT / f"{name}.json"), pretty=False)
        print(f"{OUT / name}.json: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
