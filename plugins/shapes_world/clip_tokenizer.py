"""Build SD1.5's CLIP tokenizer offline from the BPE vocabulary shipped in open_clip.

Only needed when (re)creating the model: the result is saved into the model's
``tokenizer/`` folder, so loading the model never needs ``open_clip``.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache

N_MERGES = 48894  # 49152 - 256 - 2, as in CLIP/open_clip
EXPECTED_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def default_bpe_path() -> str:
    """``AIPAINT_CLIP_BPE`` if set (a copy of ``bpe_simple_vocab_16e6.txt.gz``, for machines without
    open_clip), else the file shipped in open_clip."""
    if os.environ.get("AIPAINT_CLIP_BPE"):
        return os.environ["AIPAINT_CLIP_BPE"]
    import open_clip  # only needed at build time

    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def build_clip_tokenizer(bpe_path: str | None = None):
    """A ``transformers.CLIPTokenizer`` identical to SD1.5's (max length 77, pad = eos)."""
    from transformers import CLIPTokenizer

    path = bpe_path or default_bpe_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {v: i for i, v in enumerate(vocab)}
    assert len(encoder) == 49408, len(encoder)
    tok = CLIPTokenizer(
        vocab=encoder,
        merges=list(merges),
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    ids = tok("a photo of a cat").input_ids
    if ids != EXPECTED_CAT:
        raise RuntimeError(f"CLIP tokenizer build mismatch: {ids} != {EXPECTED_CAT}")
    return tok
