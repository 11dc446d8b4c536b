"""aipaint serve's web page in a real browser: Debian's Chromium driven by Playwright against the
real server on loopback, with the embedded model (shapes-tiny, 32x32 px, few steps).

Needs /usr/bin/chromium and the ``playwright`` package (the dev extra); ``playwright install``
is not used. Without them the tests skip, unless AIPAINT_REQUIRE_BROWSER=1 (set by .ci/run
where Chromium is installed), when they fail. Screenshots go to $AIPAINT_TEST_ARTIFACTS, else
to pytest's tmp_path.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("AIPAINT_REQUIRE_BROWSER") == "1"
PROMPT = "a big red circle on the left, on a white background"


def _missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"AIPAINT_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        yield chromium
        chromium.close()


class Running:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(browser, plugin_host, tmp_path_factory):
    """The embedded model behind the real app, with one real LoRA and one real embedding (tiny,
    for its 64-wide text encoder) in the folders the pickers list."""
    import torch
    from safetensors.torch import save_file

    import aipaint
    from aipaint.serve.app import ServerConfig, create_app

    root = tmp_path_factory.mktemp("browser-server")
    (root / "loras").mkdir()
    (root / "embeddings" / "neg").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    base = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{base}.lora_down.weight": torch.randn(4, 64, generator=g) * 0.1,
               f"{base}.lora_up.weight": torch.randn(64, 4, generator=g) * 0.1, f"{base}.alpha": torch.tensor(4.0)},
              str(root / "loras" / "tiny_style.safetensors"))
    save_file({"emb_params": torch.randn(1, 64, generator=g) * 0.1}, str(root / "embeddings" / "neg" / "tiny_emb.safetensors"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIPAINT_EMBEDDINGS_DIR", str(root / "embeddings"))
        pipeline = aipaint.load(None, host=plugin_host)
        running = Running(create_app(ServerConfig(lora_dir=root / "loras", output_dir=root / "out"), pipeline))
        yield running
        running.stop()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("AIPAINT_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url)
    # the lists the page reads at load
    page.wait_for_function("document.getElementById('sampler').options.length > 1 && "
                           "document.getElementById('scheduler').options.length > 1")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# --------------------------------------------------------------------------- helpers
def decode(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"), dtype=np.int16)


def gallery(page) -> list[np.ndarray]:
    """The gallery's images, newest first."""
    return [decode(src) for src in page.eval_on_selector_all("#gallery img", "ims => ims.map(i => i.src)")]


def generate(page, count_before: int) -> None:
    page.click("#go")
    page.wait_for_function(f"document.querySelectorAll('#gallery img').length > {count_before} || "
                           "document.getElementById('err').textContent !== ''")
    assert page.text_content("#err") == ""
    page.wait_for_function("!document.getElementById('go').disabled")


def set_value(page, selector: str, value) -> None:
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(value))


def small_txt2img(page, seed: int) -> np.ndarray:
    page.fill("#prompt", PROMPT)
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.fill("#steps", "4")
    page.fill("#seed", str(seed))
    before = len(page.query_selector_all("#gallery img"))
    generate(page, before)
    return gallery(page)[0]


def use_as_input(page, mode: str, size: tuple[int, int]) -> None:
    page.check(f"input[name=mode][value={mode}]")
    page.click("#useimg")
    page.wait_for_function(f"document.getElementById('imgc').width === {size[0]} && "
                           f"document.getElementById('imgc').height === {size[1]}")


def the_mask(page) -> np.ndarray:
    """The mask as the page sends it, thresholded as the server reads it (255 = repaint)."""
    return decode(page.evaluate("maskData()"))[..., 0] >= 128


def stroke(page, points: list[tuple[float, float]]) -> None:
    """A drag over the mask canvas through ``points`` given as fractions of its width and height."""
    box = page.locator("#maskc").bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


# --------------------------------------------------------------------------- the tests
def test_generate_then_inpaint_changes_only_the_painted_area(page, artifacts):
    page.select_option("#sampler", "DPM++ 2M")
    page.select_option("#scheduler", "Karras")
    original = small_txt2img(page, seed=5)
    assert original.shape == (32, 32, 3)
    info = first_info = page.text_content("#info")
    assert info.startswith(PROMPT) and "Size: 32x32" in info and "Seed: 5" in info
    assert "Sampler: DPM++ 2M" in info and "Schedule type: Karras" in info and "Steps: 4" in info

    use_as_input(page, "inpaint", (32, 32))
    assert page.locator("#maskc").bounding_box()["width"] == 384  # a small image is shown enlarged (x12)
    set_value(page, "#brush", 96)  # screen pixels: 8 image pixels at x12
    stroke(page, [(0.25, 0.15), (0.25, 0.85)])  # a vertical stroke around x = 8
    painted = the_mask(page)
    columns = np.flatnonzero(painted.any(axis=0))
    assert columns.min() >= 3 and columns.max() <= 13 and painted[16, 8] and painted[6:27, 6:11].all()
    # the eraser takes a horizontal band out of the stroke
    page.check("#eraser")
    stroke(page, [(0.05, 0.5), (0.45, 0.5)])
    page.uncheck("#eraser")
    mask = the_mask(page)
    assert not mask[15:18].any() and mask[6:12, 6:11].all() and mask[21:27, 6:11].all()
    assert not (mask & ~painted).any()
    # invert flips every pixel, and twice gives the same mask back
    page.click("#invertmask")
    assert np.array_equal(the_mask(page), ~mask)
    page.click("#invertmask")
    assert np.array_equal(the_mask(page), mask)
    page.screenshot(path=str(artifacts / "browser-inpaint-mask.png"))

    page.fill("#maskblur", "0")
    page.fill("#denoise", "1")
    generate(page, 1)
    result = gallery(page)[0]
    assert result.shape == original.shape
    assert np.array_equal(result[~mask], original[~mask])  # outside the mask: untouched, exactly
    assert np.abs(result[mask] - original[mask]).mean() > 2  # under it: repainted
    info = page.text_content("#info")
    assert "Denoising strength: 1" in info and "Mask blur: 0" in info and "Seed: 5" in info
    page.screenshot(path=str(artifacts / "browser-inpaint-result.png"))
    # a click on an older image shows its own parameters
    page.click("#gallery img >> nth=1")
    assert page.text_content("#info") == first_info


def test_outpaint_extends_the_chosen_sides(page, artifacts):
    original = small_txt2img(page, seed=11)
    use_as_input(page, "outpaint", (32, 32))
    page.uncheck("#out-right")
    page.click("#go")
    assert "tick at least one side" in page.text_content("#err")
    page.check("#out-right")
    page.check("#out-up")
    page.fill("#outpx", "16")
    page.fill("#maskblur", "0")
    page.fill("#denoise", "1")
    generate(page, 1)
    result = gallery(page)[0]
    assert result.shape == (48, 48, 3)  # 16 more on the right and on top
    assert np.array_equal(result[16:, :32], original)  # the old image, where it was, untouched (no blur)
    stretched = np.repeat(original[:1], 16, axis=0)  # what the page filled the new top area with
    assert not np.array_equal(result[:16, :32], stretched)  # repainted (latent noise, denoising 1)
    assert "Size: 48x48" in page.text_content("#info")
    page.screenshot(path=str(artifacts / "browser-outpaint.png"))


def test_lora_and_embedding_pickers_insert_at_the_cursor(page, artifacts):
    page.wait_for_function("document.getElementById('lora').options.length > 0 && "
                           "document.getElementById('embedding').options.length > 0")
    assert page.eval_on_selector("#lora", "s => [...s.options].map(o => o.value)") == ["tiny_style"]
    assert page.eval_on_selector("#embedding", "s => [...s.options].map(o => o.value)") == ["neg/tiny_emb"]
    page.fill("#prompt", "a red circle")
    page.eval_on_selector("#prompt", "t => t.setSelectionRange(5, 5)")  # after "a red"
    page.fill("#loraw", "0.5")
    page.click("#addlora")
    assert page.input_value("#prompt") == "a red <lora:tiny_style:0.5> circle"
    page.fill("#negative", "blurry")
    page.focus("#negative")
    page.click("#addemb")
    assert page.input_value("#negative") == "blurry tiny_emb"
    # the tags are real: the server applies both (blank size: the model's own 32x32)
    page.fill("#steps", "3")
    generate(page, 0)
    assert gallery(page)[0].shape == (32, 32, 3)
    info = page.text_content("#info")
    assert info.startswith("a red <lora:tiny_style:0.5> circle") and "Negative prompt: blurry tiny_emb" in info
    assert "Lora hashes: \"tiny_style" in info and "TI hashes: \"tiny_emb" in info and "Size: 32x32" in info
    page.screenshot(path=str(artifacts / "browser-pickers.png"))
