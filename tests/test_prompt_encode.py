"""Chunking and encoding, with a tiny CLIP text model and a tiny BPE vocabulary built here."""

from __future__ import annotations

import pytest
import torch

from aipaint.errors import InvalidParameter
from aipaint.prompt import PromptEncoder, describe, parse_prompt, tokenize_chunks

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # the CPU is shared

WORDS = ["cat", "dog", "red", "hill", "sky", "sun", "on"]


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


@pytest.fixture(scope="module")
def tokenizer():
    """A CLIP tokenizer whose vocabulary is the bytes (alone and word-final) plus a few whole words."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for word in WORDS:
        current = word[0]
        for i, char in enumerate(word[1:], start=1):
            nxt = char + ("</w>" if i == len(word) - 1 else "")
            merges.append((current, nxt))
            current += nxt
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


@pytest.fixture(scope="module")
def text_encoder(tokenizer):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # a trained CLIP's final layer norm has a bias, so its output mean is not ~0
        model.final_layer_norm.bias.normal_(0.2, 0.1)
    return model


@pytest.fixture(scope="module")
def encoder(tokenizer, text_encoder):
    return PromptEncoder(tokenizer, text_encoder)


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- tokenize_chunks -------------------------------------------------------------------------------
def test_a_short_prompt_is_one_padded_chunk(tokenizer):
    (chunk,) = tokenize_chunks(tokenizer, "a red cat")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert chunk.tokens == [bos, *ids(tokenizer, "a red cat"), eos] + [tokenizer.pad_token_id] * 72
    assert chunk.weights == [1.0] * 77 and chunk.length == 3


def test_emphasis_weights_land_on_their_tokens(tokenizer):
    (chunk,) = tokenize_chunks(tokenizer, "a (red:1.5) [cat]")
    assert chunk.weights[:5] == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])


def test_empty_prompt_is_one_empty_chunk(tokenizer):
    (chunk,) = tokenize_chunks(tokenizer, "")
    assert chunk.length == 0 and chunk.tokens[:2] == [tokenizer.bos_token_id, tokenizer.eos_token_id]


@pytest.mark.parametrize(
    ("count", "lengths"), [(75, [75]), (76, [75, 1]), (150, [75, 75]), (160, [75, 75, 10])]
)
def test_long_prompts_split_into_75_token_chunks(tokenizer, count, lengths):
    chunks = tokenize_chunks(tokenizer, words(count))
    assert [c.length for c in chunks] == lengths
    assert all(len(c.tokens) == 77 and len(c.weights) == 77 for c in chunks)
    assert all(
        c.tokens[0] == tokenizer.bos_token_id and c.tokens[c.length + 1] == tokenizer.eos_token_id
        for c in chunks
    )


def test_break_starts_a_new_chunk(tokenizer):
    assert [c.length for c in tokenize_chunks(tokenizer, "red cat BREAK dog")] == [2, 1]
    assert [c.length for c in tokenize_chunks(tokenizer, "BREAK dog")] == [0, 1]
    assert [c.length for c in tokenize_chunks(tokenizer, "dog BREAK")] == [1]
    # A BREAK right at a full chunk's edge does not add an empty chunk.
    assert [c.length for c in tokenize_chunks(tokenizer, words(75) + " BREAK dog")] == [75, 1]
    assert [c.length for c in tokenize_chunks(tokenizer, "(dog BREAK cat:1.5)")] == [1, 1]
    assert tokenize_chunks(tokenizer, "(dog BREAK cat:1.5)")[1].weights[1] == 1.5


def test_a_full_chunk_splits_after_a_recent_comma(tokenizer):
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks = tokenize_chunks(tokenizer, words(70) + ", " + words(10, "dog"))
    assert [c.length for c in chunks] == [71, 10]
    assert chunks[0].tokens[71] == comma and chunks[1].tokens[1:11] == ids(tokenizer, words(10, "dog"))
    # A comma more than 20 tokens back is too far: a hard split at 75 tokens.
    assert [c.length for c in tokenize_chunks(tokenizer, words(50) + ", " + words(30, "dog"))] == [75, 6]


def test_count_tokens(encoder):
    assert encoder.count_tokens("a red cat, on a hill") == [7]
    assert encoder.count_tokens(words(100)) == [75, 25]


# --- encoding -----------------------------------------------------------------------------------------
def test_plain_prompt_matches_diffusers_encode_prompt(tokenizer, text_encoder, encoder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for prompt in ("a red cat, on a hill", "", "sky sun"):
        with torch.no_grad():
            expected, _ = pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)
            assert torch.equal(encoder.encode(prompt), expected)


def test_emphasis_scales_token_vectors(encoder, tokenizer, text_encoder):
    plain_encoder = PromptEncoder(tokenizer, text_encoder, normalization="none")
    with torch.no_grad():
        plain = encoder.encode("a red cat")
        raw = plain_encoder.encode("a (red:1.5) cat")
        restored = encoder.encode("a (red:1.5) cat")
        lowered = plain_encoder.encode("a [red] cat")
    # Token 2 is "red" (after BOS and "a"); everything else is untouched without normalisation.
    assert torch.allclose(raw[0, 2], plain[0, 2] * 1.5)
    others = [i for i in range(77) if i != 2]
    assert torch.equal(raw[0, others], plain[0, others])
    assert raw[0, 2].norm() > plain[0, 2].norm() > lowered[0, 2].norm()
    # A1111 normalisation: the weighted output rescaled so the original mean comes back.
    assert torch.allclose(restored.mean(), plain.mean(), atol=1e-6)
    assert torch.allclose(restored, raw * (plain.mean() / raw.mean()), atol=1e-6)


def test_a_mean_of_rounding_noise_is_not_rescaled(tokenizer, text_encoder):
    """With a zero-bias final layer norm (a fresh encoder) the output mean is ~1e-9: the
    A1111 rescale would divide noise by noise. Such a chunk is only weighted; one output
    differing in the last bit must not change the result by more than the last bit."""
    fresh = transformers.CLIPTextModel(text_encoder.config).eval()
    weighting = PromptEncoder(tokenizer, fresh)
    plain = PromptEncoder(tokenizer, fresh, normalization="none")
    with torch.no_grad():
        z = fresh(torch.tensor([tokenize_chunks(tokenizer, "a (red:1.5) cat")[0].tokens])).last_hidden_state
        assert abs(z.double().mean()) < 1e-6 * z.abs().mean()
        weights = tokenize_chunks(tokenizer, "a (red:1.5) cat")[0].weights
        nudged = z + torch.randn_like(z) * 1e-7
        a, b = weighting._weighted(z, weights), weighting._weighted(nudged, weights)
        assert (a - b).abs().max() < 1e-5
        assert torch.equal(weighting.encode("a (red:1.5) cat"), plain.encode("a (red:1.5) cat"))


def test_long_prompt_encodes_each_chunk_separately(encoder, tokenizer, text_encoder):
    prompt = words(80)
    with torch.no_grad():
        out = encoder.encode(prompt)
        chunks = tokenize_chunks(tokenizer, prompt)
        second = text_encoder(torch.tensor([chunks[1].tokens])).last_hidden_state
    assert out.shape == (1, 154, 32)
    assert torch.allclose(out[:, 77:], second, atol=1e-6)


def test_encode_pair_pads_the_shorter_with_empty_chunks(encoder):
    with torch.no_grad():
        positive, negative = encoder.encode_pair(words(100), "blurry")
        empty = encoder.encode("")
        min_chunks = encoder.encode("blurry", min_chunks=3)
    assert positive.shape == negative.shape == (1, 154, 32)
    assert torch.allclose(negative[:, 77:], empty, atol=1e-6)
    assert min_chunks.shape == (1, 231, 32)


def test_clip_skip_2_is_the_normalised_penultimate_layer(tokenizer, text_encoder):
    skip2 = PromptEncoder(tokenizer, text_encoder, clip_skip=2)
    (chunk,) = tokenize_chunks(tokenizer, "a red cat")
    with torch.no_grad():
        out = text_encoder(torch.tensor([chunk.tokens]), output_hidden_states=True)
        manual = text_encoder.final_layer_norm(out.hidden_states[-2])
        encoded = skip2.encode("a red cat")
        last = PromptEncoder(tokenizer, text_encoder).encode("a red cat")
    assert torch.allclose(encoded, manual, atol=1e-6)
    assert not torch.allclose(encoded, last, atol=1e-3)


def test_sdxl_style_layer_is_the_penultimate_state_without_layer_norm(tokenizer, text_encoder):
    native = PromptEncoder(tokenizer, text_encoder, layer_offset=1, final_layer_norm=False)
    skipped = PromptEncoder(tokenizer, text_encoder, clip_skip=2, layer_offset=1, final_layer_norm=False)
    (chunk,) = tokenize_chunks(tokenizer, "a red cat")
    with torch.no_grad():
        hidden = text_encoder(torch.tensor([chunk.tokens]), output_hidden_states=True).hidden_states
        assert torch.equal(native.encode("a red cat"), hidden[-2])
        assert torch.equal(skipped.encode("a red cat"), hidden[-3])


def test_pooled_output_comes_from_the_first_chunk(encoder):
    with torch.no_grad():
        embeds, pooled = encoder.encode_with_pooled(words(80))
    assert embeds.shape == (1, 154, 32) and pooled.shape == (1, 32)


@pytest.mark.parametrize(
    "options",
    [
        {"normalization": "mean"},
        {"clip_skip": 0},
        {"clip_skip": 6},
        {"clip_skip": 1.5},
        {"clip_skip": 5, "layer_offset": 1},
        {"layer_offset": -1},
    ],
)
def test_bad_encoder_options_raise_invalid_parameter(tokenizer, text_encoder, options):
    with pytest.raises(InvalidParameter):
        PromptEncoder(tokenizer, text_encoder, **options)


def test_describe_counts_tokens_per_chunk(tokenizer):
    text = describe(parse_prompt(words(80) + " AND red"), tokenizer)
    assert "tokens per chunk: 75/75, 5/75" in text and "tokens per chunk: 1/75" in text
