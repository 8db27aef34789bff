"""Offline tokenizers built from an in-memory word list.

Nothing can be downloaded here, so the toy teacher gets tokenizers of the same *classes* SD3 uses
(``CLIPTokenizer`` twice, ``T5Tokenizer`` once), built from the world's vocabulary:

* :func:`build_clip_tokenizer` -- byte-level BPE exactly as CLIP does it: the 256 byte characters,
  their ``</w>`` end-of-word variants, and merges learned greedily from the word list until every
  given word is one token. Any other text still tokenizes, into smaller pieces (down to bytes).
* :func:`build_t5_tokenizer` -- a SentencePiece-style Unigram model: ``<pad>``, ``</s>``, ``<unk>``,
  one piece per word (``"▁red"``, also capitalised), and single characters so that unknown words
  split into characters instead of collapsing to ``<unk>``.

Both are deterministic (same words -> same files, same ids) and survive ``save_pretrained`` /
``from_pretrained``. Only the *set* of words matters: the list is de-duplicated and sorted first.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable

from transformers import CLIPTokenizer, T5Tokenizer

from sd35flash.errors import UserError

__all__ = ["build_clip_tokenizer", "build_t5_tokenizer", "clip_byte_alphabet"]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
SPM_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker


def clip_byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; every other byte ``b`` is shifted to the
    character ``256 + n`` (``n`` counting the non-printable bytes seen so far), so that no byte maps
    to whitespace or a control character.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    alphabet = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def _clean_words(words: Iterable[str]) -> list[str]:
    cleaned = sorted({w.strip() for w in words if w and w.strip()})
    if not cleaned:
        raise UserError("the tokenizer word list is empty; pass the vocabulary of the prompts")
    return cleaned


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 3:
        raise UserError(f"tokenizer max_length must be an integer >= 3, got {max_length!r}")


def _learn_bpe_merges(symbol_words: list[list[str]]) -> list[tuple[str, str]]:
    """Greedy BPE training until every word is a single symbol.

    Each step merges the most frequent adjacent pair (ties broken by the pair itself, so the
    result is deterministic) everywhere, left to right, and records it. Applying the recorded merges
    in rank order -- what a BPE tokenizer does -- then rebuilds every training word as one token.
    """
    words = [list(w) for w in symbol_words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] += 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for i, w in enumerate(words):
            out: list[str] = []
            j = 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out


def build_clip_tokenizer(words: list[str], max_length: int) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer in which every word of ``words`` is one token.

    Vocabulary layout (like OpenAI's): 256 byte characters, the same 256 with ``</w>``, one entry per
    learned merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Padding uses ``<|endoftext|>``, as
    SD3's CLIP-L tokenizer does, so the first ``<|endoftext|>`` marks the pooled position.
    """
    _check_max_length(max_length)
    cleaned = _clean_words(words)
    alphabet = clip_byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + END_OF_WORD] = len(vocab)

    # A merge-less tokenizer gives us CLIP's own normalisation and pre-tokenisation (lowercase,
    # regex split, byte-level mapping), so the merges are learned on exactly what it will see.
    base = CLIPTokenizer(vocab=dict(vocab, **{CLIP_BOS: len(vocab), CLIP_EOS: len(vocab) + 1}), merges=[])
    backend = base.backend_tokenizer
    pieces: set[str] = set()
    for word in cleaned:
        normalized = backend.normalizer.normalize_str(word)
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
            pieces.add(piece)
    symbol_words = [list(p[:-1]) + [p[-1] + END_OF_WORD] for p in sorted(pieces)]

    merges = _learn_bpe_merges(symbol_words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=max_length,
    )
    return tokenizer


def build_t5_tokenizer(words: list[str], max_length: int) -> T5Tokenizer:
    """A T5 (Unigram) tokenizer in which every word of ``words`` is one piece.

    Ids: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 (as in T5), then ``"▁"``, the word pieces
    ``"▁word"`` (as given and capitalised, since T5 does not lowercase), and every printable ASCII
    character alone and after ``"▁"``. Word pieces score far above any split into characters, so a
    known word is always a single token; an unknown word splits into characters.
    No sentinel ``<extra_id_*>`` tokens: nothing here does span corruption.
    """
    _check_max_length(max_length)
    cleaned = _clean_words(words)
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (SPM_SPACE, -6.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for word in cleaned:
        # T5 splits on whitespace first; a multi-word entry contributes each of its words.
        for part in word.split():
            add(SPM_SPACE + part, -1.0)
            add(SPM_SPACE + part[:1].upper() + part[1:], -1.5)
    chars = [c for c in string.printable if not c.isspace()]
    for ch in chars:
        add(SPM_SPACE + ch, -8.0)
    for ch in chars:
        add(ch, -10.0)
    tokenizer = T5Tokenizer(
        vocab=pieces,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=max_length,
    )
    return tokenizer
