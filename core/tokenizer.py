"""The CLIP byte-pair-encoding tokenizer of Stable Diffusion 1.x and 2.x.

Radford et al. 2021 (CLIP), Sec. 2.5: "a lower-cased byte pair encoding (BPE) representation of the text
with a 49,152 vocab size", bracketed by [SOS] and [EOS], at most 77 tokens. Byte-level BPE as in GPT-2
(Radford et al. 2019, Sec. 2.2; Sennrich et al. 2016), with "</w>" marking the end of a word.

We reproduce transformers' ``CLIPTokenizer`` (the tokenizer diffusers pipelines use), id for id:
special tokens are cut out of the raw text first; the rest is NFC-normalised, whitespace runs become one
space, each character is lower-cased; then split into words with CLIP's pattern and BPE-encoded.
One consequence worth knowing: SD 2.x folders name "!" as the pad token, and transformers then treats
every "!" in a prompt as that special token (id 0), where OpenCLIP would merge "!!!" into one token.
"""

from __future__ import annotations

import gzip
import json
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import regex
import torch

from .errors import FixativeError

BUNDLED_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP's context length
END_OF_WORD = "</w>"

# Unicode White_Space, as the Rust regex engine of transformers' tokenizer reads \s (Python's str.split differs).
WHITESPACE = regex.compile(r"\p{White_Space}+")
# CLIP's word pattern: English contractions, letter runs, single digits, runs of anything else but space.
WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\p{White_Space}\p{L}\p{N}]+""")


@lru_cache
def byte_symbols() -> dict[int, str]:
    """Each of the 256 bytes as one printable character (GPT-2's table): printable Latin-1 bytes stand for
    themselves, the others (controls, space) are shifted to code points 256 and up. The order of the table,
    printable bytes first, is the order of the first 256 vocabulary ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


@lru_cache
def bundled_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The 49,408-token vocabulary and its merges, built from the CLIP BPE file shipped in core/data."""
    try:
        lines = gzip.open(BUNDLED_BPE).read().decode("utf-8").split("\n")
    except OSError as error:
        raise FixativeError(
            f"cannot read fixative's bundled CLIP vocabulary {BUNDLED_BPE} ({error}); reinstall fixative"
        ) from error
    # after the header line, the first 49152 - 256 - 2 merges are CLIP's (OpenAI CLIP simple_tokenizer.py)
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FixativeError(f"cannot read tokenizer file {path} ({error}); provide a valid tokenizer folder") from error


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json / special_tokens_map.json: "!" or {"content": "!"}."""
    return value.get("content") if isinstance(value, dict) else value


class CLIPTokenizer:
    """``tokenizer(prompts) -> (batch, 77)`` ids: BOS, the BPE tokens, EOS, then padding."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad_token: str = EOS_TOKEN,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        model_max_length: int = MODEL_MAX_LENGTH,
    ):
        for role, token in (("pad", pad_token), ("bos", bos_token), ("eos", eos_token), ("unk", unk_token)):
            if token not in vocab:
                raise FixativeError(
                    f"the {role} token {token!r} is not in the tokenizer vocabulary; check the tokenizer files"
                )
        self.vocab = vocab
        self.merges = [tuple(pair) for pair in merges]
        self.merge_ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.tokens = {i: token for token, i in vocab.items()}
        self.pad_token, self.bos_token, self.eos_token, self.unk_token = pad_token, bos_token, eos_token, unk_token
        self.model_max_length = model_max_length
        self.byte_symbols = byte_symbols()
        self.symbol_bytes = {symbol: b for b, symbol in self.byte_symbols.items()}
        # special tokens are matched literally in the raw text, the longest first
        specials = sorted({pad_token, bos_token, eos_token, unk_token}, key=len, reverse=True)
        self.special_pattern = regex.compile("|".join(regex.escape(token) for token in specials))
        self.cache: dict[str, list[str]] = {}

    @property
    def pad_token_id(self) -> int:
        return self.vocab[self.pad_token]

    @property
    def bos_token_id(self) -> int:
        return self.vocab[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.vocab[self.eos_token]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def bundled(cls, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
        """fixative's own copy of the CLIP BPE: SD 1.x pads with "<|endoftext|>", SD 2.x with "!"."""
        vocab, merges = bundled_vocabulary()
        return cls(vocab, list(merges), pad_token=pad_token)

    @classmethod
    def from_folder(cls, folder: str | Path) -> CLIPTokenizer:
        """A diffusers ``tokenizer/`` folder: tokenizer.json, or vocab.json + merges.txt; special tokens and
        model_max_length from tokenizer_config.json, overridden by special_tokens_map.json (as transformers does)."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            model = _read_json(folder / "tokenizer.json").get("model", {})
            if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
                raise FixativeError(f"{folder / 'tokenizer.json'} does not hold a BPE model; expected a CLIP tokenizer")
            vocab = model["vocab"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        elif (folder / "vocab.json").is_file():
            vocab = _read_json(folder / "vocab.json")
            try:
                lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            except OSError as error:
                raise FixativeError(
                    f"cannot read tokenizer file {folder / 'merges.txt'} ({error}); "
                    "a vocab.json needs its merges.txt next to it"
                ) from error
            # byte symbols contain no whitespace, so a merge line splits cleanly (also with Windows line ends)
            merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        else:
            raise FixativeError(f"no tokenizer in {folder}: expected vocab.json + merges.txt or tokenizer.json")
        if any(len(pair) != 2 for pair in merges):
            raise FixativeError(f"malformed BPE merges in {folder}: each merge must be two tokens")

        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                settings.update({k: v for k, v in _read_json(folder / name).items() if v is not None})
        max_length = settings.get("model_max_length", MODEL_MAX_LENGTH)
        # transformers writes int(1e30) when no length was set
        max_length = max_length if isinstance(max_length, int) and max_length < 10**9 else MODEL_MAX_LENGTH
        tokens = {role: _token_text(settings.get(f"{role}_token")) for role in ("pad", "bos", "eos", "unk")}
        defaults = {"pad": EOS_TOKEN, "bos": BOS_TOKEN, "eos": EOS_TOKEN, "unk": EOS_TOKEN}
        tokens = {f"{role}_token": token or defaults[role] for role, token in tokens.items()}
        return cls(vocab, merges, model_max_length=max_length, **tokens)

    def save(self, folder: str | Path) -> None:
        """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, as transformers reads them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            **special,
        }
        files = {
            "vocab.json": json.dumps(self.vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
        }
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")

    def bpe(self, word: str) -> list[str]:
        """The BPE tokens of one word (in byte symbols): start from single symbols, the last marked "</w>",
        and repeatedly merge the adjacent pair that comes first in the merge list."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def _text_ids(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        text = "".join(c.lower() for c in WHITESPACE.sub(" ", text))  # per character, as transformers does
        ids = []
        for word in WORD_PATTERN.findall(text):
            symbols = "".join(self.byte_symbols[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab.get(token, self.vocab[self.unk_token]) for token in self.bpe(symbols))
        return ids

    def encode(self, text: str) -> list[int]:
        """BOS, the prompt's tokens, EOS; neither padded nor truncated."""
        ids, start = [self.bos_token_id], 0
        for special in self.special_pattern.finditer(text):
            ids += self._text_ids(text[start : special.start()]) + [self.vocab[special.group()]]
            start = special.end()
        return ids + self._text_ids(text[start:]) + [self.eos_token_id]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens left out; words separated by single spaces."""
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        symbols = "".join(self.tokens[i] for i in ids if i not in specials).replace(END_OF_WORD, " ")
        text = bytes(32 if s == " " else self.symbol_bytes[s] for s in symbols)
        return text.decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: str | list[str]) -> torch.LongTensor:
        """(batch, model_max_length) ids; a prompt too long for the text encoder is cut to BOS, its first
        tokens, EOS, with a warning that says how many tokens were dropped."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        length = self.model_max_length
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > length:
                cut = len(ids) - length
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(
                    f"prompt {shown!r} is {len(ids)} tokens long but the text encoder reads {length}: "
                    f"the last {cut} tokens were cut ({self.decode(ids[length - 1 : -1])!r})",
                    stacklevel=2,
                )
                ids = ids[: length - 1] + [self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)
