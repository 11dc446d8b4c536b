"""A1111 'parameters' text: written, read back, and read from A1111-made images."""

from __future__ import annotations

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from aipaint import __version__
from aipaint.infotext import Infotext, generation_kwargs, read_png_parameters

A1111_SAMPLE = """masterpiece, (best quality:1.2), 1girl, <lora:add_detail:0.6>
walking in the rain
Negative prompt: lowres, bad anatomy, (worst quality:1.4)
Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+, Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03, bad: 1", Version: v1.9.4"""


def test_reads_a1111_text():
    info = Infotext.from_text(A1111_SAMPLE)
    assert info.prompt == "masterpiece, (best quality:1.2), 1girl, <lora:add_detail:0.6>\nwalking in the rain"
    assert info.negative_prompt == "lowres, bad anatomy, (worst quality:1.4)"
    assert info.params["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert info.params["TI hashes"] == "easynegative: c74b4e810b03, bad: 1"
    assert info.params["Hires upscaler"] == "R-ESRGAN 4x+"
    assert info.size() == (512, 768)


def test_generation_kwargs_split_old_style_sampler_names():
    kwargs = generation_kwargs(Infotext.from_text(A1111_SAMPLE))
    assert kwargs["sampler"] == "DPM++ 2M" and kwargs["schedule"] == "Karras"
    assert (kwargs["steps"], kwargs["cfg_scale"], kwargs["seed"]) == (28, 6.5, 1234567890)
    assert (kwargs["width"], kwargs["height"], kwargs["clip_skip"]) == (512, 768, 2)


def test_round_trip_quotes_values_with_commas_and_colons():
    params = {"Steps": "20", "Sampler": "Euler a", "Note": 'a, b: "c"', "Seed": "1"}
    text = Infotext("p, q", "n", params).to_text()
    assert 'Note: "a, b: \\"c\\""' in text
    back = Infotext.from_text(text)
    assert back.params == params and back.prompt == "p, q" and back.negative_prompt == "n"


def test_prompt_only_text_is_not_mistaken_for_parameters():
    info = Infotext.from_text("a cat: cute, fluffy")
    assert info.prompt == "a cat: cute, fluffy" and info.params == {}


def test_reads_png_chunk_written_by_other_tools(tmp_path):
    png = PngInfo()
    png.add_text("parameters", A1111_SAMPLE)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png)
    assert read_png_parameters(path) == A1111_SAMPLE
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert read_png_parameters(plain) is None


def test_never_raises_on_garbage():
    for text in ["", "\n\n", "Negative prompt:", "a: b, c: d, e: f", '"unterminated: "x, y: z, w: 1']:
        Infotext.from_text(text)


def test_post_processing_entries_on_an_image_without_parameters_read_back_as_parameters():
    """An image aipaint did not generate gets A1111's layout: an empty prompt line, then one
    parameters line ending with Version, so even one or two entries are read as parameters."""
    from aipaint.plugin.postprocess import merge_infotext

    two = {"Face restoration": "RestoreFormer", "Face restoration visibility": "0"}
    text = merge_infotext("", two)
    assert text == "\nFace restoration: RestoreFormer, Face restoration visibility: 0, Version: aipaint " + __version__
    info = Infotext.from_text(text)
    assert (info.prompt, info.negative_prompt, info.params) == ("", "", {**two, "Version": f"aipaint {__version__}"})
    one = Infotext.from_text(Infotext("", "", {"Sticker": "flood, outline 3px white"}).to_text())
    assert one.prompt == "" and one.params == {"Sticker": "flood, outline 3px white"}
    prompt_only = Infotext.from_text(merge_infotext("a cat\nNegative prompt: dog", {"Sticker": "x"}))
    assert (prompt_only.prompt, prompt_only.negative_prompt) == ("a cat", "dog")  # a PNG that held only a prompt
    assert prompt_only.params == {"Sticker": "x", "Version": f"aipaint {__version__}"}
    assert Infotext.from_text("a cat\nstyle: ink, Version: 2").params == {}  # not aipaint's record: a prompt
    assert Infotext.from_text("style: ink, Version: aipaint 1").params == {}  # one line: a prompt
    kept = Infotext.from_text(merge_infotext("a cat\nSteps: 2, Seed: 1, Size: 8x8, Version: v1", {"Sticker": "x"}))
    assert kept.prompt == "a cat" and list(kept.params) == ["Steps", "Seed", "Size", "Sticker", "Version"]


def test_an_empty_first_line_takes_only_a_line_of_entries_for_parameters():
    assert Infotext.from_text("\nstyle: ink, sketch").params == {}  # "sketch" is no entry: a prompt
    assert Infotext.from_text("\nstyle: ink, sketch").prompt == "style: ink, sketch"
    assert Infotext.from_text("style: ink, mood: dark").params == {}  # no empty prompt line: A1111's rule
    negative = Infotext.from_text("\nNegative prompt: blurry\nSticker: x")
    assert (negative.prompt, negative.negative_prompt, negative.params) == ("", "blurry", {"Sticker": "x"})
