"""The tokenizer in GGUF: vocabulary, merges or SentencePiece scores, special tokens and the chat template.

Special tokens, `add_bos`/`add_eos`, merges and the chat template are read by the `gguf` package's own
`gguf.SpecialVocab` from the tokenizer as `save_pretrained` writes it. The token lists follow llama.cpp's
convert_hf_to_gguf.py: `get_vocab_base` for byte-level BPE ("gpt2" in GGUF), `_create_vocab_sentencepiece` for
SentencePiece BPE ("llama"). Two things are our own, and why:

- SentencePiece scores. llama.cpp reads them from `tokenizer.model`, which transformers 5 no longer writes (a saved
  tokenizer is `tokenizer.json` only), and the package's `LlamaHfVocab` gives every token the same placeholder
  score, which llama.cpp's merge order would misread. A SentencePiece BPE model merges by the score of the merged
  piece, and transformers' conversion to tokenizer.json orders the merges by that same score, so a piece's score here
  is minus the rank of the first merge that makes it: the same order, and llama.cpp tokenises as transformers does
  (checked in tests/test_gguf_export.py).
- The pre-tokenizer name (`tokenizer.ggml.pre`). llama.cpp recognises a byte-level BPE tokenizer by the SHA-256 of
  its encoding of a fixed text (`get_vocab_base_pre`); `LLAMACPP_PRE_TOKENIZERS` holds the rows of its table for the
  tokenizers of the architectures we export. Another hash stops the export with one line naming it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from hashlib import sha256
from pathlib import Path

from automodel.errors import UserError

logger = logging.getLogger("automodel")

# llama.cpp's convert_hf_to_gguf.py (conversion/base.py, get_vocab_base_pre): its check text and the rows of its
# hash table for these tokenizers.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
              '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
LLAMACPP_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # bigcode/starcoder2-3b
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",  # stablelm-2-zephyr-1_6b
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Write `tokenizer` (a transformers tokenizer) into the GGUF writer's metadata for a model of `vocab_size`."""
    import gguf
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="automodel-gguf-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        tokenizer_file = Path(folder) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise UserError(f"--format gguf: the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json "
                            "(a fast tokenizer) to export")
        spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        model = spec["model"]
        saved = AutoTokenizer.from_pretrained(folder)  # as llama.cpp's converter reads it: from the saved files
        if model["type"] == "BPE" and model.get("byte_fallback"):
            tokens, scores, types = sentencepiece_vocab(spec, saved, vocab_size)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            writer.add_add_space_prefix(adds_space_prefix(spec))
            special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
        elif model["type"] == "BPE":
            tokens, types = byte_level_vocab(saved, vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre_tokenizer_name(saved))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(folder, load_merges=True)
        else:
            raise UserError(f"--format gguf: a {model['type']} tokenizer has no GGUF export here "
                            "(byte-level BPE and SentencePiece BPE do)")
        special.add_to_gguf(writer, quiet=True)


def pre_tokenizer_name(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in LLAMACPP_PRE_TOKENIZERS:
        raise UserError(f"--format gguf: llama.cpp does not know this tokenizer's pre-tokenizer (hash {digest[:16]}; "
                        f"known: {', '.join(sorted(set(LLAMACPP_PRE_TOKENIZERS.values())))})")
    return LLAMACPP_PRE_TOKENIZERS[digest]


def looks_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def byte_level_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """TextModel.get_vocab_base: every id up to the model's vocab size, unused ids as [PADn]."""
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise UserError(f"--format gguf: the tokenizer has token id {max(reverse)}, beyond the model's vocab_size "
                        f"{vocab_size}")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            types.append(TOKEN_UNUSED)
            continue
        token = reverse[index]
        if token in added:
            if not decoder[index].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[index].special or looks_special(token):
                types.append(TOKEN_CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)
        tokens.append(token)
    return tokens, types


def sentencepiece_vocab(spec: dict, tokenizer, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """_create_vocab_sentencepiece's lists, from tokenizer.json (scores: see the module docstring)."""
    first_merge: dict[str, int] = {}
    for rank, merge in enumerate(spec["model"]["merges"]):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        first_merge.setdefault(left + right, rank)
    unmerged_score = -float(len(first_merge) + 1)  # single pieces: llama.cpp never looks up their scores
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [TOKEN_UNUSED] * vocab_size
    unk = spec["model"].get("unk_token")
    for piece, index in tokenizer.get_vocab().items():
        if index >= vocab_size:
            raise UserError(f"--format gguf: the tokenizer has token id {index}, beyond the model's vocab_size "
                            f"{vocab_size}")
        tokens[index] = piece.encode("utf-8")
        scores[index] = -float(first_merge[piece]) if piece in first_merge else unmerged_score
        if piece == unk:
            types[index] = TOKEN_UNKNOWN
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types[index] = TOKEN_BYTE
        else:
            types[index] = TOKEN_NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        if index >= vocab_size or added.content == unk:
            continue
        scores[index] = 0.0 if added.special else -1000.0
        if added.special or looks_special(added.content):
            types[index] = TOKEN_CONTROL
            tokens[index] = added.content.encode("utf-8")
        else:
            types[index] = TOKEN_USER_DEFINED
            tokens[index] = added.content.replace("\u2581", " ").encode("utf-8")
    return tokens, scores, types


def adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text (Metaspace prepend or a Prepend normaliser), which
    llama.cpp's SentencePiece tokenizer does when `add_space_prefix` is set."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps):
        return True
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    return any(s.get("type") == "Prepend" for s in steps)
