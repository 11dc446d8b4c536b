"""The shapes world, its captions and the evaluator behind the default model."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from aipaint_plugins.shapes_world.evaluate import adherence, read_scene, summarize
from aipaint_plugins.shapes_world.render import render
from aipaint_plugins.shapes_world.scene import (
    COLOURS,
    HELDOUT_COLOUR,
    HELDOUT_COMBOS,
    SPLITS,
    TRAIN_COLOURS,
    caption,
    noisy_caption,
    parse_caption,
    random_scene,
    scene_split,
)


def _scenes(n_per_split: int, seed: int = 123):
    rng = np.random.default_rng(seed)
    return [random_scene(rng, split) for split in SPLITS for _ in range(n_per_split)]


def test_random_scene_is_deterministic():
    a = [random_scene(np.random.default_rng(7), "train").caption for _ in range(3)]
    assert len(set(a)) == 1
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    for split in SPLITS:
        s1, s2 = random_scene(r1, split), random_scene(r2, split)
        assert s1 == s2
        assert np.array_equal(np.asarray(render(s1)), np.asarray(render(s2)))


def test_render_is_32px_rgb_and_antialiased():
    s = random_scene(np.random.default_rng(0), "train")
    im = render(s)
    assert im.size == (32, 32) and im.mode == "RGB"
    arr = np.asarray(im).reshape(-1, 3)
    assert len(np.unique(arr, axis=0)) > 2 * len(s.objects) + 1  # edge blends exist


def test_heldout_never_in_train_split():
    rng = np.random.default_rng(0)
    for _ in range(5000):
        s = random_scene(rng, "train")
        text = s.caption
        assert HELDOUT_COLOUR not in text
        for o in s.objects:
            assert o.colour != HELDOUT_COLOUR
            assert (o.colour, o.shape) not in HELDOUT_COMBOS
            assert f"{o.colour} {o.shape}" in text
        for colour, shape in HELDOUT_COMBOS:
            assert f"{colour} {shape}" not in text
        assert scene_split(s) == "train"


@pytest.mark.parametrize("split", ["heldout_combo", "heldout_colour"])
def test_heldout_splits_contain_what_they_promise(split):
    rng = np.random.default_rng(1)
    for _ in range(300):
        s = random_scene(rng, split)
        assert scene_split(s) == split


def test_scene_rules():
    rng = np.random.default_rng(2)
    n_objs = []
    for _ in range(2000):
        s = random_scene(rng, SPLITS[_ % 3])
        n_objs.append(len(s.objects))
        for o in s.objects:
            assert COLOURS[o.colour] != (255, 255, 255) and o.colour in COLOURS
        if len(s.objects) == 2:
            assert {o.position for o in s.objects} in ({"left", "right"}, {"top", "bottom"})
            a, b = s.objects
            gap = max(abs(a.cx - b.cx), abs(a.cy - b.cy)) - (a.extent + b.extent) / 2
            assert gap >= 1.0  # never overlapping or touching
    assert 0.4 < np.mean(np.array(n_objs) == 1) < 0.6


def test_captions_round_trip():
    for s in _scenes(300, seed=3):
        p = parse_caption(caption(s))
        assert p.background == s.background
        assert sorted(p.objects) == sorted(o.attrs() for o in s.objects)
    assert caption(random_scene(np.random.default_rng(0), "train", n_objects=1)).count(" background") == 1
    p = parse_caption("a big orange cross in the centre, on a grey background")
    assert p.background == "gray" and p.objects == (("cross", "orange", "big", "center"),)
    p = parse_caption("a small green cross at the top and a big blue square at the bottom, on a black background")
    assert p.objects == (("cross", "green", "small", "top"), ("square", "blue", "big", "bottom"))


def test_evaluator_reads_ground_truth():
    scenes = _scenes(170, seed=11)  # 510 renders over all splits
    right = total = 0
    for s in scenes:
        r = read_scene(render(s))
        total += 1 + 4 * len(s.objects)
        right += r.background == s.background
        want = sorted(o.attrs() for o in s.objects)
        got = sorted(o.attrs() for o in r.objects)
        if len(got) == len(want):
            right += sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    assert right / total >= 0.99, right / total


def test_evaluator_any_size_and_blur():
    from PIL import ImageFilter

    rng = np.random.default_rng(12)
    ok = 0
    scenes = [random_scene(rng, "train") for _ in range(40)]
    for s in scenes:
        im = render(s, size=128).filter(ImageFilter.GaussianBlur(2))
        ok += adherence(im, s.caption).score
    assert ok / len(scenes) > 0.95


def test_adherence():
    scenes = _scenes(30, seed=13)
    scores = []
    for i, s in enumerate(scenes):
        im = render(s)
        own = adherence(im, s.caption)
        assert own.score == 1.0 and own.all_correct and own.matched == own.total == 1 + 4 * len(s.objects)
        scores.append(own)
        other = scenes[(i + 7) % len(scenes)]
        if other.caption != s.caption:
            assert adherence(im, other.caption).score < 1.0
    summ = summarize(scores)
    assert summ["score"] == 1.0 and summ["all_correct"] == 1.0


def test_adherence_details_are_honest():
    rng = np.random.default_rng(14)
    s = random_scene(rng, "train", n_objects=1)
    im = render(s)
    o = s.objects[0]
    wrong_bg = next(b for b in ("white", "black", "gray") if b != s.background)
    text = caption(type(s)(wrong_bg, s.objects))
    a = adherence(im, text)
    assert (a.matched, a.total) == (4, 5) and not a.all_correct
    # asking for two objects when one is drawn: the missing one scores nothing
    two = f"a {o.size} {o.colour} {o.shape} on the left and a big red square on the right, on a {s.background} background"
    b = adherence(im, two)
    assert b.total == 9 and b.matched <= 1 + 4 + 1 and b.details["n_found"] == 1


def test_eval_command_reports_objects_and_adherence(tmp_path, capsys):
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import Scene, SceneObject

    from aipaint.cli.main import main

    path = tmp_path / "scene.png"
    render(Scene("black", (SceneObject("square", "green", "big", "left", 8, 16, 14),))).save(path)
    assert main(["eval", str(path), "--caption", "a big green square on the left, on a black background"]) == 0
    out = capsys.readouterr().out
    assert "background: black" in out
    assert "object: a big green square on the left" in out
    assert "adherence: 1.000 (5/5 attributes, all correct)" in out
    assert main(["eval", str(path), "--caption", "a small red circle on the right, on a white background"]) == 0
    assert "adherence: 0.000 (0/5 attributes)" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "missing.png")]) != 0
    assert "missing.png" in capsys.readouterr().err


def test_noisy_captions_swap_attributes_at_the_rate_asked_and_keep_the_splits():
    """``noisy_caption`` swaps shape, colour and size at about rate p, keeps positions and the
    background, and never writes the held-out colour or a held-out pair into a caption."""
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng, "train") for _ in range(600)]
    assert all(noisy_caption(s.caption, rng, 0.0) == s.caption for s in scenes[:50])
    swapped = {"shape": 0, "colour": 0, "size": 0}
    total = 0
    for s in scenes:
        text = noisy_caption(s.caption, rng, 0.4)
        got, want = parse_caption(text), parse_caption(s.caption)
        assert got.background == want.background and len(got.objects) == len(want.objects)
        for (shape, colour, size, pos), (shape0, colour0, size0, pos0) in zip(got.objects, want.objects):
            assert pos == pos0 and colour in TRAIN_COLOURS and (colour, shape) not in HELDOUT_COMBOS
            swapped["shape"] += shape != shape0
            swapped["colour"] += colour != colour0
            swapped["size"] += size != size0
            total += 1
    for name, n in swapped.items():
        assert 0.3 < n / total < 0.5, (name, n / total)
    assert noisy_caption("not a caption of this world", rng, 1.0) == "not a caption of this world"
    with pytest.raises(ValueError, match="caption noise"):
        noisy_caption(scenes[0].caption, rng, 1.5)


def test_noisy_captions_can_swap_only_some_attributes():
    """``attributes`` limits the swaps: shape only leaves every colour and size as it was."""
    rng = np.random.default_rng(8)
    scenes = [random_scene(rng, "train") for _ in range(300)]
    shapes = total = 0
    for s in scenes:
        got, want = parse_caption(noisy_caption(s.caption, rng, 0.4, ("shape",))), parse_caption(s.caption)
        for (shape, colour, size, pos), (shape0, colour0, size0, pos0) in zip(got.objects, want.objects):
            assert (colour, size, pos) == (colour0, size0, pos0) and (colour, shape) not in HELDOUT_COMBOS
            shapes += shape != shape0
            total += 1
    assert 0.25 < shapes / total < 0.45  # a bit under p: a swap onto a held-out pair is drawn again
    with pytest.raises(ValueError, match="among"):
        noisy_caption(scenes[0].caption, rng, 0.4, ("hue",))


def test_training_resumes_a_trained_model(tmp_path):
    """``--resume`` continues the UNet + text encoder of a model and keeps its VAE and latent scale."""
    import json
    import shutil

    from aipaint_plugins.shapes_world.train import main as train
    from safetensors.torch import load_file

    from aipaint.models.zoo import zoo_root

    source = tmp_path / "source"
    shutil.copytree(zoo_root() / "models" / "shapes-tiny", source)
    out = tmp_path / "resumed"
    assert train(["--resume", str(source), "--out", str(out), "--pool", "64", "--steps", "2", "--batch", "4",
                  "--threads", "1", "--seed", "5", "--caption-noise", "0.3"]) == 0
    record = json.loads((out / "training.json").read_text())
    run = record["unet_finetunes"][-1]
    assert run["status"] == "finished" and run["unet_text"]["steps"] == 2 and run["args"]["resume"] == str(source)
    assert run["caption_noise"] == 0.3
    assert record["unet_text"] == json.loads((source / "training.json").read_text())["unet_text"]  # the first run is kept
    vae = "vae/diffusion_pytorch_model.safetensors"
    before, after = load_file(str(source / vae)), load_file(str(out / vae))
    assert all(before[k].equal(after[k]) for k in before)
    assert json.loads((out / "vae/config.json").read_text())["scaling_factor"] == json.loads(
        (source / "vae/config.json").read_text())["scaling_factor"]
    unet = "unet/diffusion_pytorch_model.safetensors"
    moved = load_file(str(out / unet))
    assert any(not t.equal(moved[k]) for k, t in load_file(str(source / unet)).items())  # it trained
    import aipaint

    assert aipaint.load(out).txt2img("a big red circle", seed=1, steps=2, width=32, height=32).image.size == (32, 32)


def test_channel_normalization_is_folded_into_the_vae_exactly():
    """The fold gives each latent channel zero mean / unit std and decodes the new latents as before."""
    import copy

    import torch
    from aipaint_plugins.shapes_world.train import fold_channel_normalization
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16).eval()
    with torch.no_grad():  # skew the channels so that the fold has something to do
        vae.quant_conv.weight[:4] *= torch.tensor([0.1, 1.0, 3.0, 0.5]).view(-1, 1, 1, 1)
        vae.quant_conv.bias[:4] += torch.tensor([0.5, -1.0, 0.0, 2.0])
    x = torch.rand(12, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        before = vae.decode(z).sample
        before_std = vae.encode(x).latent_dist.std
        folded = copy.deepcopy(vae)
        m, d = fold_channel_normalization(folded, z)
        post = folded.encode(x).latent_dist
        after = folded.decode(post.mean).sample
    assert folded.config.scaling_factor == 1.0
    assert torch.allclose(post.mean.mean((0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(post.mean.std((0, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.allclose(post.mean, (z - m.view(1, -1, 1, 1)) / d.view(1, -1, 1, 1), atol=1e-5)
    assert torch.allclose(post.std, before_std / d.view(1, -1, 1, 1), rtol=1e-4)  # the posterior's spread moves too
    assert torch.allclose(after, before, atol=1e-5)
    assert d.max() / d.min() > 5  # the skew was there to undo


def test_training_resume_can_normalize_latent_channels(tmp_path):
    """``--resume --normalize-channels`` folds the normalization into the saved VAE and records it."""
    import json
    import shutil

    import torch
    from aipaint_plugins.shapes_world.render import render_array
    from aipaint_plugins.shapes_world.scene import random_scene
    from aipaint_plugins.shapes_world.train import main as train
    from safetensors.torch import load_file, save_file

    import aipaint
    from aipaint.models.zoo import zoo_root

    source = tmp_path / "source"
    shutil.copytree(zoo_root() / "models" / "shapes-tiny", source)
    # The shipped latent is normalized already: spread its channels apart (channel c scaled by 4^(c/(C-1)),
    # undone before the decoder, so the pictures stay the same) to have something to normalize.
    weights_file = source / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(weights_file))
    channels = weights["post_quant_conv.weight"].shape[1]
    k = 4.0 ** (torch.arange(channels, dtype=torch.float32) / (channels - 1))
    weights["quant_conv.weight"][:channels] *= k[:, None, None, None]
    weights["quant_conv.bias"][:channels] *= k
    weights["quant_conv.bias"][channels:] += 2 * torch.log(k)  # the log-variance follows the mean's scale
    weights["post_quant_conv.weight"] /= k[None, :, None, None]
    save_file(weights, str(weights_file))
    out = tmp_path / "normalized"
    assert train(["--resume", str(source), "--out", str(out), "--pool", "64", "--steps", "1", "--batch", "4",
                  "--threads", "1", "--seed", "6", "--normalize-channels"]) == 0
    run = json.loads((out / "training.json").read_text())["unet_finetunes"][-1]
    norm = run["latents"]["channel_normalization"]
    old, new = aipaint.load(source).model, aipaint.load(out).model
    assert run["latents"]["scaling_factor"] == 1.0 and len(norm["channel_std_raw"]) == old.latent_channels
    assert new.scaling_factor == 1.0
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack([render_array(random_scene(rng, "train")) for _ in range(32)])).float()
    x = x.permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        z_old, z_new = old.vae.encode(x).latent_dist.mean, new.vae.encode(x).latent_dist.mean
        assert torch.allclose(old.vae.decode(z_old).sample, new.vae.decode(z_new).sample, atol=1e-4)
    s_old = (z_old * old.scaling_factor).std((0, 2, 3))
    assert s_old.max() / s_old.min() > 3  # the spread latent's channels are far apart ...
    s_new = z_new.std((0, 2, 3))
    assert s_new.max() / s_new.min() < 2  # ... the normalized ones are not (32 images, not the pool)


def test_recoloured_twins_keep_everything_but_the_colours():
    from aipaint_plugins.shapes_world.finetune_decoder import render_twins

    images, twins = render_twins(4, "train", 12)
    for image, twin in zip(images, twins):
        seen, seen_twin = read_scene(image), read_scene(twin)
        assert seen.background == seen_twin.background
        assert len(seen.objects) == len(seen_twin.objects) > 0
        for a, b in zip(sorted(seen.objects, key=lambda o: o.position), sorted(seen_twin.objects, key=lambda o: o.position)):
            assert (a.shape, a.size, a.position) == (b.shape, b.size, b.position)
            assert a.colour != b.colour


def test_decoder_finetune_with_extrapolation_trains_only_the_decoder(tmp_path):
    import json
    import shutil

    from aipaint_plugins.shapes_world.finetune_decoder import main as finetune
    from safetensors.torch import load_file

    from aipaint.models.zoo import zoo_root

    model = tmp_path / "m"
    shutil.copytree(zoo_root() / "models" / "shapes-tiny", model)
    weights = "vae/diffusion_pytorch_model.safetensors"
    before = load_file(str(model / weights))
    assert finetune([str(model), "--pool", "40", "--steps", "2", "--batch", "4", "--extrapolate", "1.0",
                     "--threads", "1"]) == 0
    after = load_file(str(model / weights))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(before[k].equal(after[k]) for k in frozen)  # the UNet's latent space is kept
    assert any(not before[k].equal(after[k]) for k in before if k.startswith("decoder."))
    run = json.loads((model / "training.json").read_text())["decoder_finetunes"][-1]
    assert run["steps"] == 2 and run["command"].endswith("--extrapolate 1.0")


def test_latent_rgb_r2_measures_a_linear_read_of_the_patch_colour():
    """1 where each latent pixel is a linear map of its 4x4 patch's mean colour, about 0 for noise."""
    import torch
    import torch.nn.functional as F
    from aipaint_plugins.shapes_world.train import latent_rgb_r2

    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    pooled = F.avg_pool2d(x, 4)
    mix = torch.randn(4, 3)
    z = torch.einsum("nchw,kc->nkhw", pooled, mix) + 0.3  # 4 channels, a linear function of the colour
    assert latent_rgb_r2(z, x) > 0.999
    assert latent_rgb_r2(torch.randn(16, 4, 8, 8), x) < 0.05
    assert 0.3 < latent_rgb_r2(z + 0.3 * torch.randn_like(z) * z.std(), x) < 0.99  # in between


def test_training_from_scratch_records_the_vae_rgb_probe(tmp_path):
    """A from-scratch run trains all three networks, and ``--vae-rgb-probe`` is in its recipe
    together with the VAE's latent -> colour R^2."""
    import json

    from aipaint_plugins.shapes_world.train import main as train

    import aipaint

    out = tmp_path / "scratch"
    assert train(["--out", str(out), "--pool", "64", "--vae-pool-extra", "8", "--vae-steps", "2", "--vae-batch",
                  "4", "--steps", "1", "--batch", "4", "--threads", "1", "--seed", "3", "--vae-rgb-probe", "1"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["status"] == "finished" and record["vae"]["steps"] == 2 and record["unet_text"]["steps"] == 1
    assert "1.0*MSE(linear 1x1 probe" in record["recipe"]["vae_loss"]
    assert 0.0 <= record["vae"]["latent_rgb_linear_r2"] <= 1.0  # a least-squares fit with a constant
    assert aipaint.load(out).txt2img("a big red circle", seed=1, steps=2, width=32, height=32).image.size == (32, 32)


@pytest.mark.parametrize(("args", "said"), [
    (["--caption-noise-on", "shape,hue"], "hue not among shape, colour, size"),
    (["--resume", "somewhere", "--vae-rgb-probe", "1"], "--resume keeps the model's VAE"),
])
def test_training_options_that_cannot_work_fail_at_once(args, said, capsys):
    from aipaint_plugins.shapes_world.train import main as train

    with pytest.raises(SystemExit) as exit_:
        train(args)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


# --------------------------------------------------------------------------- free phrasings
_COLOURS_RE = "|".join(COLOURS)
_SHAPES_RE = "circle|square|triangle|cross"


def _arrangements(text: str) -> set[tuple[str, str]]:
    """Every (object form, background form) that could have written ``text``."""
    import re

    from aipaint_plugins.shapes_world.scene import BACKGROUND_FORMS

    objs = set()
    if re.search(rf"\b({_SHAPES_RE}) in ({_COLOURS_RE})\b", text):
        objs.add("in_colour")
    if " coloured " in text:
        objs.add("coloured")
    if re.search(rf"\b({_COLOURS_RE}) (small|big) ({_SHAPES_RE})\b", text):
        objs.add("colour_first")
    if re.search(rf"\b(small|big) ({_COLOURS_RE}) ({_SHAPES_RE})\b", text):
        objs.add("adjectives")
    if re.search(rf"\b(a|an) ({_COLOURS_RE}) ({_SHAPES_RE})\b", text):  # no size: either order
        objs |= {"adjectives", "colour_first"}
    bgs = set()
    for name, form in BACKGROUND_FORMS.items():
        pattern = re.escape(form).replace(r"\{body\}", ".+").replace(r"\{bg\}", "(white|black|gray)")
        if re.fullmatch(pattern, text):
            bgs.add(name)
    return {(o, b) for o in objs for b in bgs}


def test_free_captions_parse_back_to_the_attributes_they_ask_for():
    from aipaint_plugins.shapes_world.scene import PHRASING_MODES, free_caption

    rng = np.random.default_rng(21)
    dropped = {"size": 0, "position": 0, "background": 0}
    n = 0
    for mode in PHRASING_MODES:
        for _ in range(600):
            s = random_scene(rng, "train")
            text = free_caption(s, rng, mode)
            p = parse_caption(text)
            assert p.background in (s.background, None)
            assert (p.background is None) == (s.background not in text)
            assert len(p.objects) == len(s.objects), text
            def fits(got, want) -> bool:
                return all(g in (w, None) for g, w in zip(got, want)) and None not in got[:2]

            want = [o.attrs() for o in s.objects]
            assert any(all(fits(g, w) for g, w in zip(p.objects, order))
                       for order in itertools.permutations(want)), text
            for _shape, _colour, size, pos in p.objects:
                dropped["size"] += size is None
                dropped["position"] += pos is None
            dropped["background"] += p.background is None
            n += 1
    assert all(v > 0.1 * n for v in dropped.values()), dropped  # each optional attribute is left out at times
    assert parse_caption("a green circle on a white background") == type(parse_caption(""))(
        "white", (("circle", "green", None, None),))


def test_heldout_phrasings_are_never_produced_for_training():
    from aipaint_plugins.shapes_world.scene import HELDOUT_PHRASINGS, free_caption

    rng = np.random.default_rng(22)
    train_texts, heldout_texts = set(), set()
    for _ in range(3000):
        s = random_scene(rng, "train")
        text = free_caption(s, rng, "train")
        train_texts.add(text)
        assert not (_arrangements(text) & HELDOUT_PHRASINGS) or len(_arrangements(text)) > 1, text
        held = free_caption(s, rng, "heldout")
        heldout_texts.add(held)
        # a held-out text is unambiguous: one arrangement, a held-out one, so training never wrote it
        assert len(_arrangements(held)) == 1 and _arrangements(held) <= HELDOUT_PHRASINGS, held
    assert not train_texts & heldout_texts
    assert {a for t in heldout_texts for a in _arrangements(t)} == HELDOUT_PHRASINGS
    with pytest.raises(ValueError, match="phrasing mode"):
        free_caption(s, rng, "test")


def test_adherence_scores_only_what_a_phrasing_asks_for():
    s = random_scene(np.random.default_rng(23), "train", n_objects=1)
    o = s.objects[0]
    im = render(s)
    short = f"a {o.colour} {o.shape}"
    a = adherence(im, short)
    assert (a.matched, a.total) == (2, 2) and a.all_correct
    other = next(c for c in TRAIN_COLOURS if c != o.colour)
    b = adherence(im, f"a {other} {o.shape} {dict(left='on the left').get(o.position, 'in the middle')}")
    assert b.total == 3 and b.matched == 1 + (o.position == "left" or o.position == "center")
    summ = summarize([a, b])
    assert summ["size_acc"] is None and summ["background_acc"] is None and summ["colour_acc"] == 0.5


def test_emphasis_augmentation_weights_one_whole_word():
    import torch
    from aipaint_plugins.shapes_world.train import EMPHASIS_WEIGHTS, emphasis_multipliers

    # token ids as the CLIP tokenizer writes "<bos> a big cyan circle <eos> <pad>...": "cyan" is two tokens
    words = [[1470, 550], [7117]]
    ids = torch.tensor([[49406, 320, 1205, 1470, 550, 7117] + [49407] * 71] * 200)
    mult = emphasis_multipliers(ids, words, np.random.default_rng(0), 0.5)
    changed = mult != 1
    rows = changed.any(1)
    assert 0.35 < rows.float().mean() < 0.65
    for row, m in zip(changed[rows], mult[rows]):
        span = row.nonzero().flatten().tolist()
        assert span in ([3, 4], [5]), span  # cyan's two tokens, or circle's one
        assert len(set(m[span].tolist())) == 1 and EMPHASIS_WEIGHTS[0] <= m[span[0]] <= EMPHASIS_WEIGHTS[1]
    assert torch.equal(emphasis_multipliers(ids, words, np.random.default_rng(0), 0.0), torch.ones(ids.shape))


def test_resuming_keeps_the_models_own_schedule_unless_told(tmp_path):
    """``--resume`` without ``--schedule`` continues on the schedule the model's UNet learned
    (its scheduler config), not the from-scratch default; ``--schedule`` still switches it."""
    import json

    from aipaint_plugins.shapes_world.train import SCHEDULES, resumed_schedule
    from aipaint_plugins.shapes_world.train import main as train

    from aipaint.models.zoo import zoo_root

    shipped = zoo_root() / "models" / "shapes-tiny"
    small = ["--pool", "64", "--batch", "4", "--threads", "1", "--steps", "1"]

    def schedule_of(folder):
        return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())

    kept, switched, again = tmp_path / "kept", tmp_path / "switched", tmp_path / "again"
    assert train(["--resume", str(shipped), "--out", str(kept), *small]) == 0
    assert resumed_schedule(kept) == resumed_schedule(shipped)
    assert schedule_of(kept)["beta_end"] == schedule_of(shipped)["beta_end"]
    other = next(name for name in SCHEDULES if name != resumed_schedule(shipped))
    assert train(["--resume", str(kept), "--out", str(switched), "--schedule", other, *small]) == 0
    assert resumed_schedule(switched) == other
    assert train(["--resume", str(switched), "--out", str(again), *small]) == 0
    assert resumed_schedule(again) == other
    record = json.loads((again / "training.json").read_text())
    assert record["unet_finetunes"][-1]["schedule"] == SCHEDULES[other]


def test_training_with_phrasings_emphasis_and_moderate_schedule_continues_from_its_state(tmp_path):
    """The second generation's options train, save the schedule they trained on, and ``--state``
    lets a rerun continue the step count where the last checkpoint left it."""
    import json

    from aipaint_plugins.shapes_world.train import MODERATE_SCHEDULE
    from aipaint_plugins.shapes_world.train import main as train

    from aipaint.models.zoo import zoo_root

    out, state = tmp_path / "g2", tmp_path / "g2.state.pt"
    args = ["--resume", str(zoo_root() / "models" / "shapes-tiny"), "--out", str(out), "--pool", "64", "--batch", "4",
            "--threads", "1", "--seed", "5", "--phrasings", "0.8", "--emphasis", "0.5", "--schedule", "moderate",
            "--state", str(state), "--checkpoint-minutes", "0"]
    assert train(args + ["--steps", "2"]) == 0
    assert state.exists()
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_end"] == MODERATE_SCHEDULE["beta_end"] and sched["rescale_betas_zero_snr"] is False
    assert train(args + ["--steps", "3"]) == 0
    run = json.loads((out / "training.json").read_text())["unet_finetunes"][-1]
    assert run["unet_text"]["steps"] == 3 and run["free_phrasings"] == 0.8 and run["emphasis_augmentation"] == 0.5
    assert run["schedule"] == MODERATE_SCHEDULE


def test_the_layout_controlnet_trainer_runs_and_saves_a_loadable_controlnet(tmp_path):
    """A two-step run of the recipe behind ``shapes-tiny-controlnet-layout`` on the shipped model:
    it builds its Canny/latent pool, trains, saves a diffusers ControlNet with its record, and
    measures placement on held-out scenes."""
    import json

    from aipaint_plugins.shapes_world.controlnet_train import main as train_controlnet
    from diffusers import ControlNetModel

    from aipaint.models.zoo import zoo_root

    base = zoo_root() / "models" / "shapes-tiny"
    out, card = tmp_path / "cn", tmp_path / "card.json"
    assert train_controlnet(["--base", str(base), "--out", str(out), "--card", str(card), "--steps", "2",
                             "--pool", "48", "--batch", "4", "--eval-cases", "2"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["status"] == "finished" and record["evaluation"]["cases"] == 2
    controlnet = ControlNetModel.from_pretrained(out)
    unet_config = json.loads((base / "unet" / "config.json").read_text())
    assert controlnet.config.in_channels == unet_config["in_channels"]  # the base model's latent
    assert json.loads(card.read_text())["id"] == "shapes-tiny-controlnet-layout"
