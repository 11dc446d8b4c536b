"""benchmarks/embedded_model.py: the per-image checks, the LoRA results reader and the target table
(no model is loaded; the images are the shapes world's own renders)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("embedded_model_bench", ROOT / "benchmarks" / "embedded_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def scene(*objects, background="white"):
    from aipaint_plugins.shapes_world.scene import Scene, SceneObject

    objs = []
    for shape, colour, size, position in objects:
        cx, cy = {"left": (8.0, 16.0), "right": (24.0, 16.0), "center": (16.0, 16.0)}[position]
        objs.append(SceneObject(shape, colour, size, position, cx, cy, 13.0 if size == "big" else 8.0))
    return Scene(background, tuple(objs))


def test_colour_share_counts_the_pixels_nearest_the_asked_colour(bench):
    from aipaint_plugins.shapes_world.render import render

    big = render(scene(("square", "red", "big", "center")))
    small = render(scene(("square", "red", "small", "center")))
    assert 0.1 < bench.colour_share(big, ["red"]) < 0.3  # 13x13 of 32x32, edges blended
    assert bench.colour_share(small, ["red"]) < bench.colour_share(big, ["red"])
    assert bench.colour_share(big, ["blue"]) == 0.0
    assert bench.colour_share(big, ["red", "white"]) > 0.95  # blended edge pixels may be nearer another
    with pytest.raises(ValueError, match="not palette colours"):
        bench.colour_share(big, ["purple"])


def test_prompt_builders(bench):
    text = "a big red circle in red against a white background"
    assert bench.emphasised(text, ["red"], 1.3) == "a big (red:1.3) circle in red against a white background"
    two = "a red circle to the left and a square in red with a gray background"
    assert bench.emphasised(two, ["red", "red"], 0.8) == (
        "a (red:0.8) circle to the left and a square in (red:0.8) with a gray background")
    s = scene(("circle", "red", "big", "left"), ("square", "blue", "small", "right"))
    assert bench.and_prompt(s) == ("a big red circle on the left AND a small blue square on the right, "
                                   "on a white background")
    with pytest.raises(ValueError):
        bench.and_prompt(scene(("circle", "red", "big", "left")))


def test_image_checks_on_renders(bench):
    from aipaint_plugins.shapes_world.evaluate import adherence, read_scene
    from aipaint_plugins.shapes_world.render import render

    s = scene(("circle", "red", "big", "left"), ("square", "blue", "small", "right"))
    image = render(s)
    recoloured = dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], colour="green"), s.objects[1]))
    as_asked = adherence(image, s.caption)
    assert bench.layout_kept(as_asked) and bench.both_present(as_asked) and bench.colours_right(as_asked)
    other = adherence(image, recoloured.caption)
    assert bench.layout_kept(other)  # shapes and positions are those asked
    assert not bench.object_colour_right(other, recoloured.objects[0])
    assert bench.object_colour_right(other, recoloured.objects[1])
    assert not bench.both_present(other) and not bench.colours_right(other)
    moved = scene(("circle", "red", "big", "right"), ("square", "blue", "small", "left"))
    assert not bench.layout_kept(adherence(render(moved), s.caption))
    with pytest.raises(ValueError):
        bench.object_colour_right(as_asked, dataclasses.replace(s.objects[0], position="top"))

    assert bench.same_objects(read_scene(image), read_scene(image))
    assert not bench.same_objects(read_scene(image), read_scene(render(recoloured)))
    assert not bench.same_objects(read_scene(render(scene())), read_scene(render(scene())))  # nothing drawn
    assert bench.mean_abs_change(image, image) == 0.0
    assert bench.mean_abs_change(render(recoloured), image) > 0
    with pytest.raises(ValueError):
        bench.mean_abs_change(image, image.resize((64, 64)))


def test_recoloured_scenes_change_only_the_first_colour_and_stay_training_scenes(bench):
    from aipaint_plugins.shapes_world.scene import scene_split

    base = bench.scenes(30, seed=3000)
    for s, t in zip(base, bench.recoloured_scenes(base)):
        assert t.objects[0].colour != s.objects[0].colour
        assert dataclasses.replace(t.objects[0], colour=s.objects[0].colour) == s.objects[0]
        assert t.objects[1:] == s.objects[1:] and t.background == s.background
        assert scene_split(t) == "train"


def test_img2img_rows_with_an_img2img_that_returns_its_input(bench):
    """Nothing changes at any strength: not monotone, layout kept, the new colour never drawn."""
    pipe = SimpleNamespace(img2img=lambda image, prompt, **kw: SimpleNamespace(image=image))
    rows = bench.img2img_rows(pipe, bench.scenes(3, seed=3000))
    sweep = rows["img2img_sweep"]
    assert sweep["mean_abs_change"] == [0.0] * 9 and sweep["monotone"] is False
    assert sweep["layout_kept_0.3"] == 1.0 and sweep["new_colour_0.8"] == 0.0
    assert set(rows["img2img_to_B"]) == {0.3, 0.6, 0.9}


def test_every_sampler_with_each_of_its_schedules(bench):
    from aipaint_plugins.samplers import builtin_samplers

    pipe = SimpleNamespace(host=SimpleNamespace(registry=SimpleNamespace(samplers=builtin_samplers())))
    combos = bench.sampler_combinations(pipe)
    assert ("DPM++ 2M", "Karras") in combos and ("Euler", "Exponential") in combos
    assert ("DDIM", "Automatic") in combos and ("DDIM", "Karras") not in combos
    assert len(combos) == len(set(combos)) == sum(len(s.schedules) for s in builtin_samplers())


LORA_TXT = """## python benchmarks/lora_concept.py --threads 1   (2026-12-03)

LoRA on the held-out colour 'orange' — shapes-tiny, torch 2, 1 thread(s), 2026-12-03 17:26 UTC
evaluation: 48 images per weight (12 prompts x 4 seeds), model defaults (sampler, steps, CFG)

                                 all   white    gray   black
orange adherence, w=0            19%      0%      6%     50%
orange adherence, w=0.5          81%     62%     88%     94%
orange adherence, w=1            90%     69%    100%    100%

## an older run
orange adherence, w=0            25%      0%      6%     50%
orange adherence, w=1            70%     69%    100%    100%
"""


def test_lora_results_come_from_the_first_table(bench, tmp_path):
    path = tmp_path / "lora_concept.txt"
    path.write_text(LORA_TXT)
    r = bench.lora_from_results(path)
    assert (r["found"], r["w1"], r["w0"], r["n"]) == (True, 0.90, 0.19, 48)
    assert "2026-12-03 17:26 UTC" in r["note"] and r["command"].startswith("python benchmarks/lora_concept.py")
    assert bench.lora_from_results(tmp_path / "missing.txt")["found"] is False
    path.write_text("no table here\n")
    assert bench.lora_from_results(path)["found"] is False


def _out(**over):
    summary = {"n": 10, "all_correct": 0.98, "score": 0.99}
    features = {
        "phrasings_heldout": {"n": 10, "colour_and_background": 0.96, "all_correct": 0.8},
        "img2img_sweep": {"n": 10, "mean_abs_change": [1, 2, 3, 4, 5, 6, 7, 8, 9], "monotone": True,
                          "layout_kept_0.3": 0.9, "new_colour_0.8": 0.95},
        "prompt_edit_0.2_to_B": {"n": 10, "edited_colour": 1.0},
        "prompt_edit_0.9_to_A": {"n": 10, "edited_colour": 0.5},
        "emphasis_1.3_heldout_phrasings": {"n": 10, "colours_right": 0.95},
        "emphasis_share": {"n": 10, "higher_with_1.3": 0.9, "share_1.3": 0.2, "share_0.8": 0.1},
        "hires_x2_0.5": {"n": 10, "kept": 0.95},
        "samplers_x_schedules": {"Euler / Karras": {"n": 5, "score": 0.95}, "LMS / Automatic": {"n": 5, "score": 0.5}},
        "and_two_objects": {"n": 10, "both_present": 0.8},
    }
    out = {"train_one_object": summary, "train_two_objects": {**summary, "all_correct": 0.5},
           "heldout_combo": summary, "features": features,
           "lora": {"found": True, "w1": 0.9, "w0": 0.2, "n": 48, "note": "file"},
           "warm_timing": {"threads": 2, "images": 10, "median": 0.35}}
    out.update(over)
    return out


def test_the_table_judges_every_target(bench):
    rows = bench.build_table(_out())
    assert len(rows) == 19
    verdict = {r["behaviour"]: r["pass"] for r in rows}
    assert verdict["canonical captions, one object: all attributes right"] is True
    assert verdict["canonical captions, two objects: all attributes right"] is False
    assert verdict["unseen phrasings: all asked attributes right"] is False
    assert verdict["img2img, default CFG: change grows with strength 0.1..0.9"] is True
    assert verdict["img2img at strength 0.3: layout kept"] is True  # the threshold itself passes
    assert verdict["prompt editing [A:B:0.9]: A's colour"] is False
    assert verdict["every sampler x schedule (2): attributes present"] is False  # the worst one decides
    assert verdict["AND of two object phrases: both objects present"] is True
    assert verdict["base model without the LoRA: held-out colour"] is False  # 20% is not under 20%
    assert verdict["warm 20-step image, 2 threads"] is True
    text = bench.format_table(rows, title="t")
    assert "LMS / Automatic" in text and "FAIL" in text and "not run" not in text
    assert all(len(line.split("  ")[0]) <= 62 for line in text.splitlines()[3:])


def test_the_table_is_recorded_in_a_zoo_card_without_touching_the_rest(bench, tmp_path):
    import json

    card = tmp_path / "card.json"
    card.write_text(json.dumps({"id": "x", "defaults": {"steps": 20}, "evaluation": {"older": 1}}))
    out = _out(model="x (abc)")
    out["table"] = bench.build_table(out)
    bench.record_in_card(card, out, "python benchmarks/embedded_model.py --card card.json")
    data = json.loads(card.read_text())
    assert data["defaults"] == {"steps": 20} and data["evaluation"]["older"] == 1
    targets = data["evaluation"]["targets"]
    assert targets["command"].endswith("--card card.json") and targets["model"] == "x (abc)"
    assert len(targets["rows"]) == 19 and targets["met"] == sum(r["pass"] is True for r in out["table"])
    one = next(r for r in targets["rows"] if r["behaviour"].startswith("canonical captions, one object"))
    assert one["pass"] is True and one["target"] == "≥ 97%" and one["measured"].endswith("]")


def test_rows_left_out_say_not_run(bench):
    out = _out(features={}, warm_timing={"threads": 1, "images": 3, "median": 0.1},
               lora={"found": False, "note": "missing"})
    del out["train_two_objects"]
    rows = {r["behaviour"]: r for r in bench.build_table(out)}
    text = bench.format_table(list(rows.values()))
    assert text.count("not run") == 15
    assert rows["canonical captions, two objects: all attributes right"]["value"] is None
    assert rows["warm 20-step image, 2 threads"]["pass"] is None  # measured with 1 thread: no verdict
    assert "n/a" in text


def test_bad_sizes_are_refused_before_loading_a_model(bench):
    with pytest.raises(SystemExit):
        bench.main(["--n", "-1"])
