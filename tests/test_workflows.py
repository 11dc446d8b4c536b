"""Workflows: dynamic prompts (wildcards, variants), the X/Y/Z plot and prompts from a file (resumable)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aipaint.api.request import GenerationRequest
from aipaint.errors import AipaintError, AipaintWarning, InvalidParameter, UnknownName
from aipaint.infotext import Infotext, generation_kwargs, read_png_parameters
from aipaint.plugin.kit.folders import NameOutsideFolder
from aipaint.prompt.wildcards import MAX_NESTING, DynamicPrompts, parse_template
from aipaint.workflows import batch, parse_axis, resolve_request, xyz
from aipaint.workflows.batch import Manifest, parse_a1111_line, read_prompts
from aipaint.workflows.grid import draw_grid

PROMPT = "a big red circle on the left, on a white background"


@pytest.fixture(scope="module")
def pipe():
    import aipaint

    return aipaint.load()  # the embedded shapes-tiny model: 32x32, offline


@pytest.fixture()
def wildcards(tmp_path) -> Path:
    root = tmp_path / "wildcards"
    (root / "shapes").mkdir(parents=True)
    (root / "colour.txt").write_text("# colours\nred\n\n  blue  \n{dark|light} green\n", encoding="utf-8")
    (root / "shapes" / "round.txt").write_text("circle\nring\n", encoding="utf-8")
    (root / "shapes" / "square.txt").write_text("square\n", encoding="utf-8")
    (root / "loop.txt").write_text("__loop__\n", encoding="utf-8")
    return root


def pixels(image_or_path) -> np.ndarray:
    image = Image.open(image_or_path) if isinstance(image_or_path, (str, Path)) else image_or_path
    return np.asarray(image.convert("RGB"))


class CountingPipe:
    """A pipeline that counts its generations and can fail at one (a batch killed midway)."""

    def __init__(self, pipe, fail_at: int | None = None) -> None:
        self.pipe, self.fail_at, self.calls = pipe, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, request, progress=None, *, preview=None):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt  # what a Ctrl-C or a kill between two images leaves behind
        return self.pipe.generate(request, progress, preview=preview)


# --- dynamic prompts ------------------------------------------------------------------------------
def test_variants_resolve_from_the_seed_and_the_same_seed_gives_the_same_prompt():
    dp = DynamicPrompts()
    template = "a {big|small} {red|green|blue} circle, {2$$x|y|z}, {2$$ and $$p|q|r}"
    resolved = {seed: dp.resolve(template, seed) for seed in range(40)}
    assert all(dp.resolve(template, seed) == text for seed, text in resolved.items())
    assert len(set(resolved.values())) > 10  # the seed really draws
    for text in resolved.values():
        head, picks, joined = text.split(", ", 1)[0], text.split(", ")[1:3], text.rsplit(", ", 1)[1]
        assert head.split()[1] in ("big", "small") and head.split()[2] in ("red", "green", "blue")
        assert len(set(picks)) == 2 and set(picks) <= {"x", "y", "z"}  # two different ones
        first, _, second = joined.partition(" and ")
        assert first != second and {first, second} <= {"p", "q", "r"}
    counts = {len(dp.resolve("{1-3$$a|b|c|d}", seed).split(", ")) for seed in range(60)}
    assert counts == {1, 2, 3}
    assert {len(dp.resolve("{-2$$a|b|c}", seed).split(", ")) for seed in range(40)} == {1, 2}
    assert {len(dp.resolve("{2-$$a|b|c}", seed).split(", ")) for seed in range(40)} == {2, 3}
    assert dp.resolve("{5$$a|b}", 1) in ("a, b", "b, a")  # never more than there are
    assert {dp.resolve("{0::a|1::b}", seed) for seed in range(20)} == {"b"}  # weights


def test_a1111_syntax_and_escapes_pass_through_untouched():
    dp = DynamicPrompts()
    a1111 = r"(red:1.2) [cat|dog] [day:night:0.5] <lora:ink:0.8> \(x\) a_b __"
    assert dp.resolve(a1111, 7) == a1111
    assert dp.resolve(r"\{not a variant\} a \| b", 1) == "{not a variant} a | b"
    # A | inside A1111's [ ] within a variant is A1111's alternation, not a new option.
    assert dp.expand("{[cat|dog]|bird} {(a:1.1)|b}") == ["[cat|dog] (a:1.1)", "[cat|dog] b", "bird (a:1.1)", "bird b"]


def test_combinatorial_lists_every_combination_in_order_up_to_the_cap():
    dp = DynamicPrompts()
    assert dp.expand("a {red|blue} {circle|square}") == ["a red circle", "a red square", "a blue circle", "a blue square"]
    assert dp.expand("{2$$a|b|c}") == ["a, b", "a, c", "b, c"]
    assert dp.expand("{a|{b|c}d}!") == ["a!", "bd!", "cd!"]
    assert len(dp.expand("{a|b}" * 20, limit=50)) == 50  # 2**20 combinations, cut without listing them all
    assert dp.count_at_most("{a|b}" * 20, 50) == 51
    request = GenerationRequest(prompt="{a|b|c} {d|e}", negative_prompt="{x|y}", seed=3)
    with pytest.warns(AipaintWarning, match="more than 5 combinations"):
        jobs = resolve_request(request, dp, combinatorial=True, max_prompts=5)
    assert [(j.request.prompt, j.request.negative_prompt) for j in jobs] == [
        ("a d", "x"), ("a d", "y"), ("a e", "x"), ("a e", "y"), ("b d", "x")]
    assert all(j.template == "{a|b|c} {d|e}" and j.request.seed == 3 for j in jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(resolve_request(request, dp, combinatorial=True, max_prompts=12)) == 12


def test_wildcard_files_folders_globs_comments_and_nesting(wildcards):
    dp = DynamicPrompts(wildcards)
    assert set(dp.expand("__colour__")) == {"red", "blue", "dark green", "light green"}  # comments, blanks skipped
    assert dp.expand("a __shapes/round__") == ["a circle", "a ring"]
    assert sorted(dp.expand("__shapes/*__")) == ["circle", "ring", "square"]
    assert dp.expand("{2$$__shapes/round__}") == ["circle, ring"]  # two different lines of one file
    assert dp.resolve("__colour__ __shapes/round__", 5) == dp.resolve("__colour__ __shapes/round__", 5)
    assert dp.folder.names() == ["colour", "loop", "shapes/round", "shapes/square"]


def test_a_wildcard_never_reads_outside_its_folder(wildcards, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET\n", encoding="utf-8")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "list.txt").write_text("TOP SECRET\n", encoding="utf-8")
    (wildcards / "leak.txt").symlink_to(secret)
    (wildcards / "leakdir").symlink_to(outside, target_is_directory=True)
    dp = DynamicPrompts(wildcards)
    names = ["../secret", "shapes/../../secret", str(secret.with_suffix("")), "/etc/passwd", "~/secret", "leak",
             "leakdir/list", "shapes/./round", "../*", "leak*"]
    for name in names:
        with pytest.raises(InvalidParameter) as caught:
            dp.resolve(f"a __{name}__", 1)
        message = str(caught.value)
        assert "\n" not in message and "TOP SECRET" not in message
        assert "wildcard" in message
        if name in ("../secret", "/etc/passwd", "leak", "leakdir/list"):
            assert isinstance(caught.value, NameOutsideFolder)
    assert "leak" not in dp.folder.names() and not any(n.startswith("leakdir") for n in dp.folder.names())
    with pytest.raises(NameOutsideFolder):
        dp.check("{a|__leak__}")  # checked before any generation, in every option


def test_dynamic_prompt_errors_are_typed_one_line(wildcards):
    dp = DynamicPrompts(wildcards)
    cases = {"{a|b": "never closed", "a}": "closes no", "__loop__": "refers to itself", "__nope__": "no file nope.txt",
             "{3-1$$a|b}": "must not be above", "{" * (MAX_NESTING + 2) + "}" * (MAX_NESTING + 2): "deep"}
    for template, words in cases.items():
        with pytest.raises(InvalidParameter, match=words) as caught:
            dp.resolve(template, 1)
        assert "\n" not in str(caught.value)
    with pytest.raises(InvalidParameter, match="no wildcards folder"):
        DynamicPrompts().resolve("__colour__", 1)
    with pytest.raises(InvalidParameter, match="is not a folder"):
        DynamicPrompts(wildcards / "missing").resolve("__colour__", 1)


def test_parsing_takes_linear_time():
    hostile = ["__a_" * 50_000, "{a}" * 60_000, "[|" * 100_000, "{1$$" * 100 + "x" * 100_000, "\\{" * 100_000,
               "{" + "1.5::a|" * 30_000 + "}", "_" * 200_000]
    for text in hostile:
        started = time.perf_counter()
        try:
            parse_template(text)
        except InvalidParameter:
            pass
        assert time.perf_counter() - started < 3, text[:20]


def test_resolved_prompts_stay_bounded(tmp_path):
    root = tmp_path / "w"
    root.mkdir()
    for i in range(30):  # each file names the next one twice: 2**30 copies unless the work is bounded
        (root / f"l{i}.txt").write_text(f"__l{i + 1}__ __l{i + 1}__\n", encoding="utf-8")
    (root / "l30.txt").write_text("word\n", encoding="utf-8")
    dp = DynamicPrompts(root)
    started = time.perf_counter()
    for resolve in (lambda: dp.resolve("__l0__", 1), lambda: dp.expand("__l0__", 5)):
        with pytest.raises(InvalidParameter, match="resolves to more than"):
            resolve()
    assert time.perf_counter() - started < 5


def test_generate_with_wildcards_records_the_template_and_regenerates(pipe, wildcards, tmp_path, capsys):
    from aipaint.cli.main import main

    out = tmp_path / "a.png"
    template = "a big {red|blue} __shapes/round__ on the left, on a white background"
    args = ["generate", template, "--wildcards", str(wildcards), "--steps", "2", "--seed", "4", "--no-progress"]
    assert main([*args, "-o", str(out)]) == 0
    info = Infotext.from_text(read_png_parameters(out))
    assert info.params["Template"] == template and info.params["Seed"] == "4"
    assert info.prompt == DynamicPrompts(wildcards).resolve(template, 4)
    again = tmp_path / "b.png"
    assert main([*args, "-o", str(again)]) == 0
    assert Infotext.from_text(read_png_parameters(again)).prompt == info.prompt  # the same seed, the same prompt
    regenerated = tmp_path / "c.png"
    assert main(["generate", "--from-png", str(out), "-o", str(regenerated), "--no-progress"]) == 0
    assert np.array_equal(pixels(out), pixels(regenerated))
    assert main(["generate", "{a|b", "--dynamic", "-o", str(tmp_path / "d.png"), "--no-progress"]) == 2
    assert "never closed" in capsys.readouterr().err and not (tmp_path / "d.png").exists()


def test_generate_combinatorial_writes_one_image_per_combination(pipe, tmp_path):
    from aipaint.cli.main import main

    out = tmp_path / "c.png"
    assert main(["generate", "a {big|small} {red|blue} circle", "--combinatorial", "--steps", "1", "--seed", "2",
                 "-o", str(out), "--no-progress"]) == 0
    prompts = [Infotext.from_text(read_png_parameters(tmp_path / f"c-{i}.png")).prompt for i in range(4)]
    assert prompts == ["a big red circle", "a big blue circle", "a small red circle", "a small blue circle"]


# --- the X/Y/Z plot -------------------------------------------------------------------------------
def test_axis_values_are_read_as_a1111_reads_them():
    cases = {
        "seed: 1-3": (1, 2, 3), "Steps: 1-10 (+3)": (1, 4, 7, 10), "steps: 4-8 [3]": (4, 6, 8), "steps: 5-1": (5, 4, 3, 2, 1),
        "seed: 1-3, 7, -1": (1, 2, 3, 7, -1), "cfg: 1-2 (+0.25)": (1.0, 1.25, 1.5, 1.75, 2.0),
        "CFG Scale: 0-1 [5]": (0.0, 0.25, 0.5, 0.75, 1.0), "cfg: 7, 3.5": (7.0, 3.5),
        'Prompt S/R: red, "deep blue, dark", green': ("red", "deep blue, dark", "green"),
        "sampler: Euler a, DPM++ 2M": ("Euler a", "DPM++ 2M"),
    }
    for text, values in cases.items():
        assert parse_axis(text).values == values, text
    assert parse_axis("cfg: 7").labels == ["CFG Scale: 7"] and parse_axis("sampler: Euler").labels == ["Euler"]
    option = parse_axis("lora.folder: a, b")
    assert option.name == "lora.folder" and option.values == ("a", "b")
    assert parse_axis("option tome.ratio: 0.3").option == "tome.ratio"
    bad = {"cfg 1,2": "TYPE: VALUES", "colour: 1": "axis type", "steps: 1-5 (+0)": "step of 0",
           "steps: 1-5 (-1)": "makes no values", "steps: 1-100000": "at most", "steps: 2.5": "whole numbers",
           "seed: 1-9999999999999999999999": "whole numbers", "seed: " + "9" * 40: "too long", "cfg: nan": "finite"}
    for text, words in bad.items():
        with pytest.raises(InvalidParameter, match=words):
            parse_axis(text)
    with pytest.raises(UnknownName):
        parse_axis("colour: 1")


def test_xyz_grid_of_cfg_by_seed_has_each_cell_in_its_place(pipe, tmp_path):
    cfgs, seeds = (1.0, 3.0, 7.0), (1, 2, 3)
    result = xyz(pipe, GenerationRequest(PROMPT, steps=3), x="cfg: 1, 3, 7", y="seed: 1-3", output=tmp_path / "grid.png")
    assert result.grid_paths == [tmp_path / "grid.png"] and len(result.cells) == 9
    grid = Image.open(tmp_path / "grid.png")
    grid_params = Infotext.from_text(grid.info["parameters"]).params
    assert grid_params["X Type"] == "CFG Scale" and grid_params["Y Values"] == "1-3"
    assert np.array_equal(pixels(grid), pixels(result.grids[0].image))
    images = {}
    for cell in result.cells:
        assert cell.path == tmp_path / "grid-cells" / f"x{cell.x}-y{cell.y}.png"
        params = Infotext.from_text(read_png_parameters(cell.path)).params
        assert float(params["CFG scale"]) == cfgs[cell.x] and int(params["Seed"]) == seeds[cell.y]
        assert cell.request.cfg_scale == cfgs[cell.x] and cell.request.seed == seeds[cell.y]
        assert cell.labels == (f"CFG Scale: {cfgs[cell.x]:g}", f"Seed: {seeds[cell.y]}")
        left, top, right, bottom = cell.box
        assert (right - left, bottom - top) == (32, 32)
        assert np.array_equal(pixels(grid.crop(cell.box)), pixels(cell.path))  # the grid shows the cell's own image
        images[cell.x, cell.y] = pixels(cell.path)
    # Boxes go right along X and down along Y; every cell is a different picture.
    assert result.cell(1, 0).box[0] > result.cell(0, 0).box[0] and result.cell(0, 1).box[1] > result.cell(0, 0).box[1]
    assert len({im.tobytes() for im in images.values()}) == 9
    # Labels: the header band above the first row and the label band left of the first column hold dark text.
    first = result.cell(0, 0).box
    assert pixels(grid.crop((first[0], 0, grid.width, first[1]))).min() < 100
    assert pixels(grid.crop((0, first[1], first[0], grid.height))).min() < 100
    # Each cell regenerates alone, bit for bit, from the parameters in its PNG.
    for cell in result.cells:
        kwargs = generation_kwargs(Infotext.from_text(read_png_parameters(cell.path)))
        again = pipe.generate(GenerationRequest(**kwargs))
        assert np.array_equal(pixels(again.image), images[cell.x, cell.y])


def test_xyz_cell_regenerates_with_generate_from_png(pipe, tmp_path):
    from aipaint.cli.main import main

    result = xyz(pipe, GenerationRequest(PROMPT, steps=2, seed=9), x="cfg: 2, 5", output=tmp_path / "g.png")
    cell = result.cell(1)
    out = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(cell.path), "-o", str(out), "--no-progress"]) == 0
    assert np.array_equal(pixels(out), pixels(cell.path))


def test_xyz_other_axes_and_one_grid_per_z(pipe, tmp_path):
    result = xyz(pipe, GenerationRequest(PROMPT, steps=2, seed=1), x="Prompt S/R: red, blue",
                 y="sampler: euler a, DPM++ 2M", z="steps: 1, 2", output=tmp_path / "p.png")
    assert result.grid_paths == [tmp_path / "p-0.png", tmp_path / "p-1.png"] and all(p.is_file() for p in result.grid_paths)
    cell = result.cell(1, 0, 1)
    assert cell.request.prompt == PROMPT.replace("red", "blue") and cell.request.sampler == "Euler a"
    assert cell.request.steps == 2 and cell.path.name == "x1-y0-z1.png"
    assert cell.labels == ("blue", "Euler a", "Steps: 2")
    for grid, z in zip(result.grids, (0, 1)):
        for c in (c for c in result.cells if c.z == z):
            assert np.array_equal(pixels(grid.image.crop(c.box)), pixels(c.image))


def test_xyz_option_axis_and_lora_weight(pipe, tmp_path):
    lora = GenerationRequest(PROMPT + " <lora:missing:0.8>", steps=1)
    plot = xyz(pipe, GenerationRequest(PROMPT, steps=1), x="option lora.folder: /x, /y", output=None)
    assert [str(c.request.options["lora"].folder) for c in plot.cells] == ["/x", "/y"]
    assert [c.labels for c in plot.cells] == [("lora.folder: /x",), ("lora.folder: /y",)]
    from aipaint.workflows.xyz import _apply, _check_axis

    axis = _check_axis(parse_axis("LoRA weight: 0, 0.5"), lora, pipe.host.registry)
    assert _apply(axis, lora, 0.5).prompt.endswith("<lora:missing:0.5>")
    with pytest.raises(InvalidParameter, match="needs a <lora"):
        xyz(pipe, GenerationRequest(PROMPT), x="lora weight: 0, 1")


def test_xyz_with_wildcards_resolves_each_cell_after_prompt_sr(pipe, wildcards):
    dp = DynamicPrompts(wildcards)
    plot = xyz(pipe, GenerationRequest("a __colour__ thing", steps=1), x="Prompt S/R: colour, shapes/round",
               y="seed: 1, 2", dynamic=dp)
    for cell in plot.cells:
        template = "a __colour__ thing" if cell.x == 0 else "a __shapes/round__ thing"
        assert cell.template == template and cell.request.prompt == dp.resolve(template, cell.request.seed)
        assert Infotext.from_text(cell.infotext).params["Template"] == template
    with pytest.raises(NameOutsideFolder):
        xyz(CountingPipe(pipe, fail_at=1), GenerationRequest("a __colour__"), x="Prompt S/R: colour, ../x", dynamic=dp)


def test_xyz_checkpoint_axis_loads_each_model_once(pipe, tmp_path):
    loaded = []

    def load(name):
        loaded.append(name)
        return pipe

    plot = xyz(None, GenerationRequest(PROMPT, steps=1), x="seed: 1, 2", y="checkpoint: first, second", load=load)
    assert loaded == ["first", "second"]  # cells are grouped by model, whatever the axis
    assert [c.model for c in plot.cells] == ["first", "first", "second", "second"]
    assert plot.cell(0, 1).labels == ("Seed: 1", "second")
    with pytest.raises(InvalidParameter, match="loaded pipeline"):
        xyz(None, GenerationRequest(PROMPT), x="seed: 1, 2")


def test_xyz_checks_everything_before_the_first_generation(pipe, tmp_path):
    counting = CountingPipe(pipe)
    (tmp_path / "g-cells").mkdir()
    (tmp_path / "g-cells" / "x1.png").write_bytes(b"mine")
    with pytest.raises(InvalidParameter, match="exists already"):
        xyz(counting, GenerationRequest(PROMPT, steps=1), x="cfg: 1, 2", output=tmp_path / "g.png")
    with pytest.raises(UnknownName):
        xyz(counting, GenerationRequest(PROMPT, steps=1), x="sampler: Euler, Nope")
    with pytest.raises(InvalidParameter, match="cfg_scale"):
        xyz(counting, GenerationRequest(PROMPT, steps=1), x="cfg: 7, 99")
    with pytest.raises(InvalidParameter, match="not in the prompt"):
        xyz(counting, GenerationRequest(PROMPT, steps=1), x="Prompt S/R: purple, green")
    with pytest.raises(InvalidParameter, match="init image"):
        xyz(counting, GenerationRequest(PROMPT, steps=1), x="denoising: 0.3, 0.6")
    with pytest.raises(InvalidParameter, match="at most 4 cells"):
        xyz(counting, GenerationRequest(PROMPT, steps=1), x="seed: 1-3", y="steps: 1-2", max_cells=4)
    assert counting.calls == 0
    assert (tmp_path / "g-cells" / "x1.png").read_bytes() == b"mine"


def test_xyz_command_line(pipe, tmp_path, capsys):
    from aipaint.cli.main import main

    out = tmp_path / "cli.png"
    assert main(["xyz", PROMPT, "--x", "steps: 1, 2", "--y", "cfg: 3, 7", "--seed", "5", "-o", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(list((tmp_path / "cli-cells").glob("*.png"))) == 4
    assert main(["xyz", PROMPT, "--x", "steps: 1, 2", "-o", str(out), "--no-progress"]) == 2  # no overwrite
    assert "exists already" in capsys.readouterr().err
    assert main(["xyz", PROMPT, "-o", str(tmp_path / "none.png")]) == 2
    assert "at least one axis" in capsys.readouterr().err


def test_grid_drawing_keeps_cells_unchanged():
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(3)] for _ in range(2)]
    grid = draw_grid(images, ["a", "a much longer column label that wraps", "c"], ["row one", "row two"], "title")
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            assert np.array_equal(pixels(grid.image.crop(grid.boxes[r][c])), pixels(image))
    bare = draw_grid([[images[0][0]]])
    assert bare.image.size == (30, 40) and bare.boxes == [[(0, 0, 30, 40)]]


# --- prompts from a file --------------------------------------------------------------------------
def test_prompts_file_lines_read_like_a1111(tmp_path):
    fields, runs = parse_a1111_line('--prompt a red circle --negative_prompt "blue, green" --steps 20 --cfg_scale 7 '
                                    '--seed 1 --sampler_name "Euler a" --width 32 --height 32 --n_iter 3 '
                                    '--outpath_samples x --restore_faces false')
    assert fields == {"prompt": "a red circle", "negative_prompt": "blue, green", "steps": 20, "cfg_scale": 7.0,
                      "seed": 1, "sampler": "Euler a", "width": 32, "height": 32} and runs == 3
    assert parse_a1111_line("  just a prompt -- with dashes ") == ({"prompt": "just a prompt -- with dashes"}, 1)
    for line, words in {"--steps": "needs a value", "--colour red": "not an option", "--steps x": "whole number",
                        "--restore_faces true": "not supported", "--sd_model m": "not supported",
                        '--prompt "open': "cannot be read"}.items():
        with pytest.raises(InvalidParameter, match=words):
            parse_a1111_line(line)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "steps": 2}\n\n# note\n{"prompt": "b", "n_iter": 2}\n', encoding="utf-8")
    assert [(line.number, line.fields, line.iterations) for line in read_prompts(path)] == [
        (1, {"prompt": "a", "steps": 2}, 1), (4, {"prompt": "b"}, 2)]
    path.write_text('{"prompt": "a", "stepz": 2}\n', encoding="utf-8")
    with pytest.raises(InvalidParameter, match="stepz.*steps"):
        read_prompts(path)


def write_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "a big red circle on the left, on a white background\n"
        '--prompt "a blue square" --steps 2 --seed 5 --sampler_name "Euler a" --n_iter 2\n'
        "# a comment\n\n"
        '--prompt "a green triangle" --negative_prompt "red" --cfg_scale 5 --seed 11 --batch_size 2\n'
        "a big red circle on the left, on a white background\n",  # the same line twice: two images
        encoding="utf-8")
    return path


def test_a_killed_batch_resumes_without_redoing_or_losing_an_image(pipe, tmp_path):
    prompts, out = write_prompts(tmp_path), tmp_path / "out"
    base = GenerationRequest("", steps=1)
    killed = CountingPipe(pipe, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        batch(killed, prompts, out, base=base)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2  # two jobs finished before the kill
    finished = {name: (out / name).stat().st_mtime_ns for record in records for name in record["files"]}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(finished)
    time.sleep(0.01)

    resumed = CountingPipe(pipe)
    events = []
    report = batch(resumed, prompts, out, base=base, on_progress=events.append)
    assert resumed.calls == 3 and len(report.generated) == 4 and len(report.skipped) == 2  # 5 jobs, 6 images
    assert [e.status for e in events] == ["skipped", "skipped", "generated", "generated", "generated"]
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished  # not written again
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 5 and len({r["id"] for r in records}) == 5
    assert sorted(p.name for p in out.glob("*.png")) == sorted(n for r in records for n in r["files"])
    by_line = {}
    for record in records:
        by_line.setdefault(record["line"], []).append(record)
    assert [r["seeds"] for r in by_line[2]] == [[5], [6]]  # n_iter: the next run goes on from the last seed
    assert by_line[5][0]["seeds"] == [11, 12] and by_line[5][0]["negative_prompt"] == "red"
    assert len(by_line[1]) == 1 and len(by_line[6]) == 1 and by_line[1][0]["id"] != by_line[6][0]["id"]
    assert all(r["seconds"] > 0 and "total" in r["timings"] for r in records)
    for record in records:  # each image regenerates from its parameters
        params = Infotext.from_text(read_png_parameters(out / record["files"][0])).params
        assert int(params["Seed"]) == record["seeds"][0] and params["Steps"] in ("1", "2")

    again = CountingPipe(pipe)
    assert len(batch(again, prompts, out, base=base).skipped) == 6 and again.calls == 0


def test_a_record_cut_short_or_lost_is_repaired_without_regenerating(pipe, tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("a red circle\na blue circle\n", encoding="utf-8")
    base = GenerationRequest("", steps=1, seed=3)
    batch(pipe, prompts, out, base=base)
    manifest = out / "manifest.jsonl"
    first, second = manifest.read_text().splitlines()
    manifest.write_text(first + "\n" + second[: len(second) // 2])  # killed while writing the second record
    counting = CountingPipe(pipe)
    report = batch(counting, prompts, out, base=base)
    assert counting.calls == 0 and len(report.skipped) == 2
    reader = Manifest(manifest)
    records = reader.read()
    assert reader.skipped_lines == 1 and len(records) == 2
    recovered = [r for r in records.values() if r.get("recovered")]
    assert len(recovered) == 1 and recovered[0]["prompt"] == "a blue circle" and recovered[0]["seeds"] == ["3"]
    assert manifest.read_text().endswith("\n")


def test_batch_command_line_with_json_lines_and_wildcards(pipe, wildcards, tmp_path, capsys):
    from aipaint.cli.main import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a __colour__ circle", "seed": 1}\n{"prompt": "a {big|small} circle", "seed": 2}\n',
                       encoding="utf-8")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "-o", str(out), "--steps", "1", "--wildcards", str(wildcards)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 2 and "[2/2] line 2" in captured.err
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["template"] for r in records] == ["a __colour__ circle", "a {big|small} circle"]
    assert records[0]["prompt"] == DynamicPrompts(wildcards).resolve("a __colour__ circle", 1)
    params = Infotext.from_text(read_png_parameters(out / records[1]["files"][0])).params
    assert params["Template"] == "a {big|small} circle" and params["Steps"] == "1"
    assert main(args) == 0 and "0 images generated, 2 done before" in capsys.readouterr().err
    prompts.write_text('{"prompt": "a __../secret__ circle"}\n', encoding="utf-8")
    assert main(args) == 2
    assert "line 1" in capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 2


def test_batch_combinatorial_makes_one_job_per_combination(pipe, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {red|blue} circle\n", encoding="utf-8")
    report = batch(pipe, prompts, tmp_path / "out", base=GenerationRequest("", steps=1),
                   dynamic=DynamicPrompts(), combinatorial=True)
    texts = sorted(Infotext.from_text(read_png_parameters(p)).prompt for p in report.generated)
    assert texts == ["a blue circle", "a red circle"]
    counting = CountingPipe(pipe)
    assert len(batch(counting, prompts, tmp_path / "out", base=GenerationRequest("", steps=1), dynamic=DynamicPrompts(),
                     combinatorial=True).skipped) == 2 and counting.calls == 0


def test_batch_errors_name_the_line_before_anything_runs(pipe, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("fine\n--prompt x --steps 0\n", encoding="utf-8")
    counting = CountingPipe(pipe)
    with pytest.raises(InvalidParameter, match="line 2: invalid steps=0"):
        batch(counting, prompts, tmp_path / "out")
    prompts.write_text("fine\n--prompt x --sampler_name Nope\n", encoding="utf-8")
    with pytest.raises(AipaintError, match="line 2"):
        batch(counting, prompts, tmp_path / "out")
    assert counting.calls == 0 and not (tmp_path / "out" / "manifest.jsonl").exists()
    assert not list((tmp_path / "out").glob("*.png"))
