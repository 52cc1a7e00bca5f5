"""Hugging Face tokenizers: a `tokenizer.json` (the `tokenizers` library, what transformers' fast
tokenizers run) or the vocabulary and merges inside a GGUF file, with the special tokens and chat
template of the checkpoint they came with.

Special tokens, in the order transformers reads them: tokenizer_config.json (bos_token, eos_token,
pad_token: a string or {"content": ...}), then generation_config.json, then config.json
(bos_token_id, eos_token_id: an id or a list, the first is the end; pad_token_id). No pad token:
EOS pads, unless a prompt contains EOS (a chat turn ends with it): then another special token does. Whether a sequence starts with BOS is what the tokenizer's own post-processor adds
(Llama-3: <|begin_of_text|>; Qwen2: nothing), or tokenizer_config's add_bos_token.

Chat template: tokenizer_config.json's `chat_template` (or GGUF's tokenizer.chat_template),
rendered with jinja2 as transformers renders it (sandboxed, trim_blocks, lstrip_blocks,
bos_token / eos_token / raise_exception in scope). A prompt becomes one user turn followed by the
generation prompt; its answer is the assistant's content followed by EOS (the end of the turn).
"""
from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import TokenizerError

# A placeholder that no template changes, to cut the rendered turn into what comes before and after
# the user's content.
_CONTENT = "\u2063CONTENT\u2063"
# llama.cpp's pre-tokenizer types (tokenizer.ggml.pre) as `tokenizers` pre-tokenizers: the split
# patterns of GPT-2 (its ByteLevel default), SmolLM (digits one by one, then GPT-2's), Llama-3 and Qwen2.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")


class HFTokenizer:
    """encode / decode / vocab_size / bos_id / eos_id / pad_id / name as the other tokenizers, plus
    `prefix` (the ids a sequence starts with) and, with a chat template, chat turns (see wrap)."""

    def __init__(self, tk, name: str, specials: dict, add_bos: bool | None, template: str | None, chat: bool):
        self.tk, self.name = tk, name
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = specials.get("bos")
        self.eos_id = specials.get("eos")
        if self.eos_id is None:
            raise TokenizerError(f"{name}: no EOS token (tokenizer_config.json eos_token, or eos_token_id in "
                                 f"generation_config.json / config.json)")
        self.pad_id = specials.get("pad", self.eos_id)
        self.prefix = _leading_specials(tk)
        if add_bos and self.bos_id is not None and not self.prefix:
            self.prefix = [self.bos_id]
        self.chat_template = template      # the checkpoint's, used for prompts only when `chat`
        self._chat = _split_turn(self) if template and chat else None
        # The model reads padding from the ids (MindFormers masks every key equal to pad_token_id), so the
        # pad id must never stand for a real token of a prompt. Chat models often pad with EOS, which a
        # chat turn contains (SmolLM2: <|im_end|>): pad with a special token the prompts never use.
        used = set(self.wrap([]))
        if self.pad_id in used:
            spare = sorted(i for i, t in tk.get_added_tokens_decoder().items() if t.special and i not in used
                           and i != self.bos_id)
            if not spare:
                raise TokenizerError(f"{name}: the pad token (id {self.pad_id}) occurs in every prompt and the "
                                     f"tokenizer has no other special token to pad with; set "
                                     f"model.tokenizer.chat_template=false")
            self.pad_id = spare[0]

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def chat(self) -> bool:
        return self._chat is not None

    def wrap(self, content_ids: list[int]) -> list[int]:
        """A prompt's ids: the user's turn and the generation prompt around its content (chat), or
        the prefix before it."""
        if self._chat is None:
            return self.prefix + content_ids
        head, tail = self._chat
        return head + content_ids + tail

    def answer_ids(self, text: str) -> list[int]:
        """An answer's ids, EOS included: in a chat, the assistant's content without leading spaces
        (" A" of the plain MMLU prompt is "A" after the generation prompt)."""
        return self.encode(text.lstrip() if self._chat else text) + [self.eos_id]

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return render_template(self.chat_template, messages, add_generation_prompt, self.token(self.bos_id),
                               self.token(self.eos_id))

    def token(self, i: int | None) -> str:
        return "" if i is None else self.tk.id_to_token(i)


def hf_tokenizer_files(tok: HFTokenizer, seq_length: int) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json (its special tokens and chat template) for a folder that
    transformers and load_hf_tokenizer read back to the same ids."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.token(tok.eos_id),
              "pad_token": tok.token(tok.pad_id), "model_max_length": seq_length}
    if tok.bos_id is not None:
        config["bos_token"] = tok.token(tok.bos_id)
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    return {"tokenizer.json": tok.tk.to_str().encode(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode()}


def render_template(template: str, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    """A chat template rendered the way transformers renders it (apply_chat_template)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos, eos_token=eos)
    except TemplateError as e:
        raise TokenizerError(f"chat template: {e}") from None


def _split_turn(tok: HFTokenizer) -> tuple[list[int], list[int]]:
    text = tok.render([{"role": "user", "content": _CONTENT}], add_generation_prompt=True)
    if text.count(_CONTENT) != 1:
        raise TokenizerError(f"{tok.name}: the chat template does not show a user message's content once")
    head, tail = text.split(_CONTENT)
    return tok.encode(head), tok.encode(tail)


def _leading_specials(tk) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (BOS, if it adds one)."""
    plain = tk.encode("a", add_special_tokens=False).ids
    full = tk.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _first(value) -> int | None:
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def folder_specials(folder: Path, tk) -> tuple[dict, bool | None, str | None]:
    """(specials {bos, eos, pad}, add_bos_token, chat template) from a checkpoint folder's files."""
    tcfg = _read_json(folder / "tokenizer_config.json")
    gen, conf = _read_json(folder / "generation_config.json"), _read_json(folder / "config.json")
    specials = {}
    for key in ("bos", "eos", "pad"):
        token = _content(tcfg.get(f"{key}_token"))
        i = tk.token_to_id(token) if token else None
        if i is None:
            i = _first(gen.get(f"{key}_token_id"))
        if i is None:
            i = _first(conf.get(f"{key}_token_id"))
        if i is not None:
            specials[key] = int(i)
    template = tcfg.get("chat_template")
    if isinstance(template, list):   # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return specials, tcfg.get("add_bos_token"), template


def tokenizer_json_file(path: str | Path) -> Path:
    """tokenizer.json itself, or inside the folder `path`."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"model.tokenizer.path: {file} not found (kind hf reads a tokenizer.json or a folder "
                             f"holding one)")
    return file


def load_hf_tokenizer(path: str | Path, chat: bool = True) -> HFTokenizer:
    """A tokenizer.json (or its folder) with the special tokens and chat template beside it."""
    from tokenizers import Tokenizer

    file = tokenizer_json_file(path)
    try:
        tk = Tokenizer.from_file(str(file))
    except Exception as e:   # the tokenizers library's own parse error
        raise TokenizerError(f"model.tokenizer.path: {file} is not a Hugging Face tokenizer.json "
                             f"({' '.join(str(e).split())[:160]})") from None
    specials, add_bos, template = folder_specials(file.parent, tk)
    return HFTokenizer(tk, f"hf:{file.parent.name}/{file.name}", specials, add_bos, template, chat)


def load_gguf_tokenizer(path: str | Path, chat: bool = True) -> HFTokenizer:
    """The tokenizer a GGUF file carries (tokenizer.ggml.*): a byte-level BPE (model gpt2) with the
    file's vocabulary, merges, pre-tokenizer type, special tokens and chat template."""
    from finetune.config.gguf_config import gguf_fields

    fields = gguf_fields(path)
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {model!r} is not supported (supported: gpt2, the "
                             f"byte-level BPE of Llama-3, Qwen2, SmolLM and GPT-2)")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE:
        raise TokenizerError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(GGUF_PRE)})")
    tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    tk = _byte_level_bpe(tokens, merges, pre, [tokens[i] for i, t in enumerate(types) if t == 3])
    specials = {key: int(fields[f"tokenizer.ggml.{name}_token_id"])
                for key, name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
                if f"tokenizer.ggml.{name}_token_id" in fields}
    return HFTokenizer(tk, f"gguf:{Path(path).name}", specials, bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                       fields.get("tokenizer.chat_template"), chat)


def _byte_level_bpe(tokens: list[str], merges: list[tuple[str, str]], pre: str, control: list[str]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "qwen2"):
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT), behavior="isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tk
