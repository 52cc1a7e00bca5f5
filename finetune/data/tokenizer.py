"""Tokenizers: SentencePiece (InternLM's tokenizer.model), tiktoken rank files, and the built-in
tiktoken encoding of the tiny demo model. All load from local files only; nothing downloads.

Every tokenizer (these two and data/hf_tokenizer.HFTokenizer) exposes the same small surface:
``encode(text) -> list[int]`` (no BOS/EOS added), ``decode(ids) -> str``, ``vocab_size``,
``bos_id``, ``eos_id``, ``pad_id``, ``name``, ``prefix`` (the ids a sequence starts with),
``wrap(content_ids)`` (a prompt's ids: prefix + content, or a chat turn around it),
``answer_ids(text)`` (an answer's ids, EOS included) and ``chat`` (whether prompts are chat turns).
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import regex

from finetune.errors import TokenizerError

# cl100k_base's split pattern: words keep their leading space, digits in groups of up to three.
PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
           r"""|\s*[\r\n]|\s+(?!\S)|\s+""")

# Prompt words of the MMLU/CMMLU templates, so the tiny model sees them as single tokens.
_PROMPT_TEXT = ("The following are multiple choice questions (with answers) about subject.\n\n"
                "Question?\nA. a\nB. b\nC. c\nD. d\nAnswer: A B C D\n"
                "以下是关于的单项选择题，请直接给出正确答案的选项。题目：答案是：")


class PlainPrompts:
    """Prompts without a chat template: [bos] + the prompt's ids; an answer ends with EOS."""
    chat = False

    @property
    def prefix(self) -> list[int]:
        return [self.bos_id]

    def wrap(self, content_ids: list[int]) -> list[int]:
        return [self.bos_id] + content_ids

    def answer_ids(self, text: str) -> list[int]:
        return self.encode(text) + [self.eos_id]


class SentencePieceTokenizer(PlainPrompts):
    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"model.tokenizer.path: SentencePiece model {path} not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:   # "Internal: could not parse ModelProto from ..."
            hint = ("; it is a tiktoken rank file: use model.tokenizer.kind=tiktoken"
                    if _looks_like_tiktoken(path) else "")
            raise TokenizerError(f"model.tokenizer.path: {path} is not a SentencePiece model "
                                 f"({' '.join(str(e).split())[:120]}){hint}") from None
        self.name = f"sentencepiece:{path.name}"
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # InternLM's model has no pad piece (-1); it pads with EOS (pad_token_id 2 in its config).
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class TiktokenTokenizer(PlainPrompts):
    def __init__(self, ranks: dict[bytes, int], name: str):
        import tiktoken

        n = len(ranks)
        self.bos_id, self.eos_id, self.pad_id = n, n + 1, n + 2
        self.enc = tiktoken.Encoding(
            name=name, pat_str=PAT_STR, mergeable_ranks=ranks,
            special_tokens={"<|bos|>": self.bos_id, "<|eos|>": self.eos_id, "<|pad|>": self.pad_id})
        self.name = name
        self.vocab_size = n + 3

    def encode(self, text: str) -> list[int]:
        # disallowed_special=() : text that happens to contain "<|eos|>" is encoded as plain text.
        return self.enc.encode(text, disallowed_special=())

    def decode(self, ids) -> str:
        specials = {self.bos_id, self.eos_id, self.pad_id}
        return self.enc.decode([int(i) for i in ids if int(i) not in specials])


def read_tiktoken_file(path: str | Path) -> dict[bytes, int]:
    """A .tiktoken rank file: one 'base64(token) rank' per line (tiktoken's own format)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"model.tokenizer.path: tiktoken rank file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("ascii")   # base64 and digits only
    except UnicodeDecodeError as e:
        hint = "; a SentencePiece tokenizer.model? use model.tokenizer.kind=sentencepiece" if b"\x00" in raw[:4096] \
            or raw[:1] == b"\n" else ""
        raise TokenizerError(f"model.tokenizer.path: {path} is not a tiktoken rank file (binary byte "
                             f"0x{raw[e.start]:02x} at offset {e.start}; expected lines 'base64token rank'){hint}") from None
    if not text.strip():
        raise TokenizerError(f"model.tokenizer.path: {path} is empty (expected lines 'base64token rank')")
    ranks = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r}") from e
    return ranks


def _looks_like_tiktoken(path: Path) -> bool:
    head = Path(path).read_bytes()[:200].split(b"\n")[0].split()
    return len(head) == 2 and head[1].isdigit()


def builtin_ranks() -> dict[bytes, int]:
    """The tiny model's encoding: the 256 bytes, then every prefix of every word of the demo
    vocabulary. With all prefixes present, BPE merging of a known word always ends in one token
    (the leftmost part plus its neighbour is always a prefix, so a merge is always possible);
    unknown text falls back to shorter pieces and, at worst, bytes."""
    from finetune.data.demo import vocabulary_texts

    ranks = {bytes([b]): b for b in range(256)}
    pattern = regex.compile(PAT_STR)
    for text in [_PROMPT_TEXT, *vocabulary_texts()]:
        for piece in pattern.findall(text):
            data = piece.encode("utf-8")
            for end in range(2, len(data) + 1):
                ranks.setdefault(data[:end], len(ranks))
    return ranks


def load_tokenizer(kind: str, path: str | None, chat_template: bool = True):
    """kind: 'sentencepiece' (path to tokenizer.model), 'tiktoken' (path to a .tiktoken rank file,
    or null for the built-in demo encoding), 'hf' (tokenizer.json, its folder, or a .gguf file; with
    chat_template, the checkpoint's chat template if it has one: data/hf_tokenizer.py)."""
    if kind == "hf":
        from finetune.data.hf_tokenizer import load_gguf_tokenizer, load_hf_tokenizer

        if not path:
            raise TokenizerError("model.tokenizer.path: kind hf needs a tokenizer.json, its folder or a .gguf file")
        if str(path).endswith(".gguf"):
            return load_gguf_tokenizer(path, chat_template)
        return load_hf_tokenizer(path, chat_template)
    if kind == "sentencepiece":
        if not path:
            raise TokenizerError("model.tokenizer.path: a SentencePiece tokenizer.model path is required")
        return SentencePieceTokenizer(path)
    if kind == "tiktoken":
        if path:
            return TiktokenTokenizer(read_tiktoken_file(path), name=f"tiktoken:{Path(path).name}")
        return TiktokenTokenizer(builtin_ranks(), name="tiktoken:builtin-demo")
    raise TokenizerError(f"model.tokenizer.kind: expected 'sentencepiece', 'tiktoken' or 'hf', got {kind!r}")


def tokenizer_fingerprint(tok) -> str:
    """Short hash of what the tokenizer does to a fixed probe text (used in data cache keys)."""
    probe = _PROMPT_TEXT + " the quick brown fox 12345 ünïcödé 中文"
    # a prompt's and an answer's ids too: a chat template (or its absence) changes both
    h = hashlib.sha256(f"{tok.name}|{tok.vocab_size}|{tok.encode(probe)}|{tok.wrap([7])}|{tok.answer_ids(' A')}"
                       f"|{tok.pad_id}".encode())
    return h.hexdigest()[:12]
