"""aipaint serve, the A1111 parts beyond plain generation: extras (upscale, face restoration),
txt2img's hires fix, restore_faces, saved prompt styles, and error messages that keep the
server's folders to themselves. Driven with webuiapi and httpx on loopback, on the embedded
model at 32 px."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("uvicorn")

from test_serve import Running, b64, picture  # noqa: E402

from aipaint.serve.app import ImageModel, ServerConfig, create_app, hide_paths  # noqa: E402

SMALL = dict(width=32, height=32, steps=3, cfg_scale=5.0, sampler_name="Euler")
STYLES = """name,prompt,negative_prompt
# a comment row,x,y
warm,"warm colours, {prompt}",cold
blue,on a blue background,"blurry, ugly"
only negative,,text
"""


@pytest.fixture(scope="module")
def upscaler_folder(tmp_path_factory) -> Path:
    """A 2x super-resolution network and a face restorer, tiny, as a user's upscaler folder holds them."""
    from safetensors.torch import save_file
    from test_facefix import _compact_state, _tiny_restoreformer_state

    folder = tmp_path_factory.mktemp("upscalers")
    save_file(_compact_state(), str(folder / "2x-compact.safetensors"))
    (folder / "faces").mkdir()
    save_file(_tiny_restoreformer_state(), str(folder / "faces" / "RestoreFormer.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"not weights")
    return folder


@pytest.fixture(scope="module")
def shapes_pipe(plugin_host):
    import aipaint

    return aipaint.load(host=plugin_host)  # the embedded model: 32 px, and face fix inpaints at 32 px


@pytest.fixture(scope="module")
def server(shapes_pipe, upscaler_folder, tmp_path_factory):
    styles = tmp_path_factory.mktemp("styles") / "styles.csv"
    styles.write_text("\ufeff" + STYLES, encoding="utf-8")  # A1111 writes no BOM, Excel does
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIPAINT_UPSCALER_DIR", str(upscaler_folder))
        config = ServerConfig(model=None, output_dir=tmp_path_factory.mktemp("out"), queue_size=4, styles_file=styles)
        running = Running(create_app(config, shapes_pipe))
        yield running
        running.stop()


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def decoded(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def post(server, endpoint: str, body) -> httpx.Response:
    return httpx.post(f"{server.url}/sdapi/v1/{endpoint}", json=body, timeout=120)


def gradient(size=(32, 32)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    y = np.linspace(0, 255, size[1], dtype=np.uint8)
    return Image.fromarray(np.stack(np.broadcast_arrays(x[None, :], y[:, None], 128 + 0 * x[None, :]), axis=2))


# --------------------------------------------------------------------------- the lists
def test_upscalers_face_restorers_and_latent_modes_are_the_installed_ones(server):
    upscalers = httpx.get(f"{server.url}/sdapi/v1/upscalers").json()
    names = [u["name"] for u in upscalers]
    assert names[:2] == ["None", "Lanczos"] and "Nearest" in names
    model = next(u for u in upscalers if u["name"] == "2x-compact")
    assert model["scale"] == 2 and model["model_path"] == "2x-compact.safetensors"  # relative: no server path
    assert set(model) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert "faces/RestoreFormer" not in names and "broken" not in names  # a face restorer is no upscaler
    assert not any(name.startswith("Latent") for name in names)
    latent = [m["name"] for m in httpx.get(f"{server.url}/sdapi/v1/latent-upscale-modes").json()]
    assert latent[0] == "Latent" and "Latent (bicubic antialiased)" in latent
    restorers = httpx.get(f"{server.url}/sdapi/v1/face-restorers").json()
    assert restorers == [{"name": "faces/RestoreFormer", "cmd_dir": None, "architecture": "RestoreFormer"}]


# --------------------------------------------------------------------------- extras
def test_extra_single_image_upscales_through_webuiapi(api, server):
    generated = api.txt2img(prompt="a red square", seed=5, **SMALL).image
    result = api.extra_single_image(generated, upscaler_1="Lanczos", upscaling_resize=2)
    assert result.image.size == (64, 64)
    assert np.array_equal(np.asarray(result.image), np.asarray(generated.convert("RGB").resize((64, 64), Image.LANCZOS)))
    assert result.info == "<p>Postprocess upscaler: Lanczos, Postprocess upscale by: 2</p>"
    text = result.image.info["parameters"]  # the source's parameters, with what extras did
    assert text.startswith("a red square\n") and "Seed: 5" in text and "Postprocess upscaler: Lanczos" in text
    model = api.extra_single_image(generated, upscaler_1="2X-Compact", upscaling_resize=2)  # any case, as A1111
    assert model.image.size == (64, 64) and "Postprocess upscaler: 2x-compact" in model.info
    assert not np.array_equal(np.asarray(model.image), np.asarray(result.image))
    unchanged = api.extra_single_image(generated)  # webuiapi's defaults: upscaler "None", no faces
    assert unchanged.image.size == (32, 32)
    assert np.array_equal(np.asarray(unchanged.image.convert("RGB")), np.asarray(generated.convert("RGB")))


def test_extras_resize_to_a_size_crop_and_a_second_upscaler(server):
    source = gradient((32, 16))
    body = {"image": b64(source), "resize_mode": 1, "upscaling_resize_w": 48, "upscaling_resize_h": 48,
            "upscaler_1": "Nearest"}
    cropped = decoded(post(server, "extra-single-image", body).json()["image"])
    covering = source.resize((96, 48), Image.NEAREST)  # covers 48x48, then cut to it around its centre
    assert cropped.size == (48, 48) and np.array_equal(np.asarray(cropped), np.asarray(covering.crop((24, 0, 72, 48))))
    uncropped = post(server, "extra-single-image", {**body, "upscaling_crop": False}).json()
    assert decoded(uncropped["image"]).size == (96, 48)  # A1111: the covering size, not stretched
    blended = post(server, "extra-single-image", {"image": b64(source), "upscaler_1": "Nearest", "upscaler_2": "Lanczos",
                                                  "extras_upscaler_2_visibility": 0.25, "upscaling_resize": 2}).json()
    expected = Image.blend(source.resize((64, 32), Image.NEAREST), source.resize((64, 32), Image.LANCZOS), 0.25)
    assert np.array_equal(np.asarray(decoded(blended["image"])), np.asarray(expected))
    assert "Postprocess upscaler 2: Lanczos" in blended["html_info"]
    noted = post(server, "extra-single-image", {"image": b64(source), "upscale_first": True, "foo": 1}).json()
    assert noted["html_info"] == "<p></p><p>ignored fields: upscale_first, foo</p>"


def test_extra_batch_images_keep_their_order(api):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    result = api.extra_batch_images([picture(c, 16) for c in colours], upscaler_1="Bicubic", upscaling_resize=3)
    assert [image.size for image in result.images] == [(48, 48)] * 3
    assert [image.convert("RGB").getpixel((24, 24)) for image in result.images] == colours


def test_extras_restore_faces_with_the_installed_restorer(server, monkeypatch):
    """gfpgan_visibility runs the face-restore post-processor with the folder's GFPGAN weights.
    The folder's restorer is a (tiny) RestoreFormer; a GFPGAN is 330 MB, so the test calls it one."""
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.Resampling.BOX)
    body = {"image": b64(photo), "gfpgan_visibility": 1.0}
    refused = post(server, "extra-single-image", body)
    assert refused.status_code == 422
    assert refused.json()["detail"] == ("invalid gfpgan_visibility=1.0: needs GFPGAN weights in UPSCALER_DIR, and there "
                                        "are none (face restorers there: 'faces/RestoreFormer' (RestoreFormer); see GET "
                                        "/sdapi/v1/face-restorers)")
    app_server = server.app.state.server
    real = app_server.image_models
    monkeypatch.setattr(app_server, "image_models", lambda: [
        ImageModel(m.name, m.file, "GFPGAN" if m.purpose == "FaceSR" else m.architecture, m.purpose, m.scale)
        for m in real()])
    reply = post(server, "extra-single-image", body).json()
    restored = np.asarray(decoded(reply["image"]).convert("RGB"))
    changed = np.any(restored != np.asarray(photo), axis=2)
    assert 0.02 < changed.mean() < 0.5  # the face, and nothing far from it
    assert not changed[:, :40].any() and not changed[200:].any()
    assert "Face restoration: RestoreFormer" in reply["html_info"] and "GFPGAN visibility: 1" in reply["html_info"]


def test_extras_wait_their_turn_in_the_queue(server):
    queue = server.app.state.server.queue
    out: dict = {}
    with queue.turn("holding"):
        thread = threading.Thread(target=lambda: out.setdefault("reply", post(server, "extra-single-image", {
            "image": b64(picture()), "upscaler_1": "Lanczos"})), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while queue.waiting < 2:
            assert time.monotonic() < deadline, "the extras request never took its place"
            time.sleep(0.01)
        time.sleep(0.2)
        assert "reply" not in out  # waits for the running job
    thread.join(30)
    assert out["reply"].status_code == 200 and decoded(out["reply"].json()["image"]).size == (64, 64)


# --------------------------------------------------------------------------- hires fix, restore faces
def test_hires_fix_through_webuiapi(api):
    plain = api.txt2img(prompt="a big red circle on the left", seed=7, **SMALL)
    hires = api.txt2img(prompt="a big red circle on the left", seed=7, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                        hr_second_pass_steps=2, denoising_strength=0.6, **SMALL)
    assert hires.image.size == (64, 64) and plain.image.size == (32, 32)
    text = hires.info["infotexts"][0]
    assert "Size: 32x32" in text  # as A1111: the first pass's size, and the hires settings
    for entry in ("Hires upscale: 2", "Hires steps: 2", "Hires upscaler: Latent", "Denoising strength: 0.6"):
        assert entry in text
    assert hires.image.info["parameters"] == text
    assert not {"enable_hr", "hr_scale", "hr_upscaler", "denoising_strength"} & set(hires.info["ignored_fields"])
    assert "denoising_strength" not in plain.info["ignored_fields"] and "Hires" not in plain.info["infotexts"][0]


def test_hires_fix_sizes_prompts_and_batches(server):
    body = {"prompt": "a blue square", "seed": 3, **SMALL, "enable_hr": True, "hr_upscaler": "lanczos",
            "hr_resize_x": 48, "hr_resize_y": 0, "hr_prompt": "a green square", "batch_size": 2, "n_iter": 2}
    reply = post(server, "txt2img", body).json()
    info = json.loads(reply["info"])
    assert [decoded(image).size for image in reply["images"]] == [(48, 48)] * 4  # y from the first pass's aspect
    assert info["all_seeds"] == [3, 4, 5, 6]
    assert all("Hires resize: 48x48" in t and "Hires prompt: a green square" in t and "Hires upscaler: Lanczos" in t
               for t in info["infotexts"])
    wide = post(server, "txt2img", {**body, "n_iter": 1, "batch_size": 1, "width": 64, "hr_resize_x": 0,
                                    "hr_resize_y": 48}).json()
    assert decoded(wide["images"][0]).size == (96, 48)
    ignored = json.loads(post(server, "txt2img", {**body, "n_iter": 1, "batch_size": 1,
                                                  "hr_scheduler": "Karras"}).json()["info"])["ignored_fields"]
    assert ignored == ["hr_scheduler"]
    none = post(server, "txt2img", {**body, "n_iter": 1, "batch_size": 1, "hr_upscaler": "None"}).json()
    assert "Hires upscaler: Lanczos" in json.loads(none["info"])["infotexts"][0]  # A1111's "None": a plain resize


def test_restore_faces_runs_face_fix_on_each_image(server, monkeypatch):
    import aipaint_plugins.facefix.fix as fix
    from aipaint_plugins.facefix.detect import Detection

    body = {"prompt": "a red circle", "seed": 11, **SMALL}
    plain = post(server, "txt2img", body).json()
    found = []
    monkeypatch.setattr(fix, "detect_faces", lambda image, *args, **kwargs: (
        found.append(image.size) or [Detection((16, 16, 28, 28), 0.9)], "test detector"))
    fixed = post(server, "txt2img", {**body, "restore_faces": True}).json()
    before, after = (np.asarray(decoded(r["images"][0]).convert("RGB")) for r in (plain, fixed))
    changed = np.any(before != after, axis=2)
    assert changed[16:28, 16:28].mean() > 0.5 and not changed[:8].any() and not changed[:, :8].any()
    text = json.loads(fixed["info"])["infotexts"][0]
    assert "ADetailer model: test detector" in text and "Seed: 11" in text
    assert "restore_faces" not in json.loads(fixed["info"])["ignored_fields"]
    found.clear()
    init = {"init_images": [plain["images"][0]], "denoising_strength": 0.5}
    reply = post(server, "img2img", {**body, **init, "restore_faces": True, "enable_hr": True})
    assert reply.status_code == 200 and found == [(32, 32)]  # img2img: faces fixed; enable_hr is txt2img's
    assert "enable_hr" in json.loads(reply.json()["info"])["ignored_fields"]


# --------------------------------------------------------------------------- styles
def test_prompt_styles_are_listed_and_applied_in_order(api, server):
    assert api.get_prompt_styles() == [
        {"name": "warm", "prompt": "warm colours, {prompt}", "negative_prompt": "cold"},
        {"name": "blue", "prompt": "on a blue background", "negative_prompt": "blurry, ugly"},
        {"name": "only negative", "prompt": "", "negative_prompt": "text"},
    ]
    result = api.txt2img(prompt="a red circle", negative_prompt="dark", styles=["warm", "blue", "only negative"], seed=1,
                         **SMALL)
    assert result.info["prompt"] == "warm colours, a red circle, on a blue background"
    assert result.info["negative_prompt"] == "dark, cold, blurry, ugly, text"  # no {prompt} in these: appended
    assert result.info["infotexts"][0].startswith("warm colours, a red circle, on a blue background\n"
                                                  "Negative prompt: dark, cold, blurry, ugly, text\n")
    assert "styles" not in result.info["ignored_fields"]
    hires = post(server, "txt2img", {"prompt": "x", "styles": ["blue"], "enable_hr": True, "hr_prompt": "y",
                                     "hr_upscaler": "Nearest", **SMALL}).json()
    assert 'Hires prompt: "y, on a blue background"' in json.loads(hires["info"])["infotexts"][0]


def test_styles_module_reads_a1111_files(tmp_path):
    from aipaint.errors import InvalidParameter, UnknownName
    from aipaint.prompt.styles import apply_styles, load_styles, merge_prompt, parse_styles

    assert merge_prompt("{prompt}, oil", "a cat") == "a cat, oil"
    assert merge_prompt("oil", " ") == "oil" and merge_prompt("", "a cat ") == "a cat"
    styles = parse_styles("name,text\nold,from the text column\nold,the later row wins\n")  # A1111's old column name
    assert styles["old"].prompt == "the later row wins" and styles["old"].negative_prompt == ""
    with pytest.raises(UnknownName, match=r"invalid style='nope': valid values are 'old'"):
        apply_styles("a", "b", ["old", "nope"], styles)
    with pytest.raises(InvalidParameter, match="first row is name,prompt,negative_prompt"):
        parse_styles("prompt,negative_prompt\na,b\n")
    bad = tmp_path / "styles.csv"
    bad.write_bytes(b"name,prompt\n\xff\xfe,x\n")
    with pytest.raises(InvalidParameter, match="is not UTF-8 text"):
        load_styles(bad)
    with pytest.raises(InvalidParameter, match="cannot be read"):
        load_styles(tmp_path / "missing.csv")


def test_aipaint_serve_styles_option(monkeypatch, tmp_path, capsys):
    import aipaint.serve.app as app_module
    from aipaint.cli.main import main

    started = {}
    monkeypatch.setattr(app_module, "serve", lambda config, host, port: started.update(config=config))
    styles = tmp_path / "styles.csv"
    styles.write_text(STYLES, encoding="utf-8")
    assert main(["serve", "--styles", str(styles)]) == 0 and started["config"].styles_file == styles
    styles.write_text("prompt\nx\n", encoding="utf-8")
    assert main(["serve", "--styles", str(styles)]) == 2
    assert "must be a CSV file whose first row is name,prompt,negative_prompt" in capsys.readouterr().err


# --------------------------------------------------------------------------- paths stay on the server
def test_error_messages_name_folders_not_paths(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path / "controlnet"))
    monkeypatch.setenv("AIPAINT_LORA_DIR", str(tmp_path / "loras"))
    (tmp_path / "loras").mkdir()
    for model, why in (("../../etc/passwd", "'..', '.' and empty parts are not allowed"),
                       ("/etc/passwd", "absolute paths are not allowed")):
        unit = {"model": model, "image": b64(picture())}
        reply = post(server, "txt2img", {"prompt": "x", **SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert reply.status_code == 422
        assert reply.json()["detail"].startswith(f"invalid ControlNet model='{model}': must be a name inside "
                                                 f"CONTROLNET_DIR ({why})")  # the client's own text comes back
        assert str(tmp_path) not in reply.text
    reply = post(server, "txt2img", {"prompt": "<lora:missing:1>", **SMALL})
    assert reply.status_code == 422 and "the folder LORA_DIR holds no lora files" in reply.json()["detail"]
    assert str(tmp_path) not in reply.text


def test_hide_paths(tmp_path):
    config = ServerConfig(lora_dir=tmp_path / "loras", output_dir=tmp_path / "out", models_dir=tmp_path / "models")
    assert hide_paths(f"no {tmp_path / 'loras'}/a/b.safetensors here", config) == "no LORA_DIR/a/b.safetensors here"
    assert hide_paths(f"cannot write '{tmp_path / 'out' / 'x.png'}'", config) == "cannot write 'OUTDIR/x.png'"
    assert hide_paths(f"{tmp_path / 'models2'} is missing", config) == "<server path> is missing"
    assert hide_paths("use POST /sdapi/v1/options (see /etc/hosts)", config) == "use POST /sdapi/v1/options (see <server path>)"
    assert hide_paths("see /etc/hosts", config, sent='{"model": "/etc/hosts"}') == "see /etc/hosts"
    assert hide_paths(r"C:\Users\me\x.ckpt missing", config) == "<server path> missing"


# --------------------------------------------------------------------------- bad input (docs/serving.md)
BAD = [
    ("extra-single-image", {"image": "%%%"}, "cannot read image: it is not valid base64"),
    ("extra-single-image", {}, "invalid image=None: must be a base64-encoded image"),
    ("extra-single-image", {"image": "PIC", "upscaler_1": "R-ESRGAN 4x+"},
     "invalid upscaler_1='R-ESRGAN 4x+': valid values are 'None', 'Lanczos', 'Nearest', 'Bicubic', '2x-compact'"),
    ("extra-single-image", {"image": "PIC", "upscaler_1": "Latent"},
     "invalid upscaler_1='Latent': resizes latents, which only hires fix can do"),
    ("extra-single-image", {"image": "PIC", "upscaler_1": "Lanczos", "resize_mode": 2},
     "invalid resize_mode=2: must be 0 (scale by upscaling_resize) or 1"),
    ("extra-single-image", {"image": "PIC", "upscaler_1": "Lanczos", "upscaling_resize": 0},
     "invalid upscaling_resize=0: must be above 0 to 16"),
    ("extra-single-image", {"image": "PIC", "upscaler_1": "Lanczos", "upscaling_resize": 16},
     "invalid upscaled size of 'image'='512x512': is 262,144 pixels, more than the limit of 100,000"),
    ("extra-single-image", {"image": "PIC", "codeformer_visibility": 0.5},
     "invalid codeformer_visibility=0.5: needs CodeFormer weights in UPSCALER_DIR"),
    ("extra-single-image", {"image": "PIC", "gfpgan_visibility": 2}, "invalid gfpgan_visibility=2: must be from 0.0 to 1.0"),
    ("extra-batch-images", {"imageList": []}, "invalid imageList=[]: must be a list of"),
    ("extra-batch-images", {"imageList": [{"data": "PIC"}, {"data": 5}]},
     "invalid imageList[1].data=5: must be a base64-encoded image"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_upscaler": "4x-nope"},
     "invalid hr_upscaler='4x-nope': valid values are 'None', 'Latent', "),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_scale": 9}, "invalid hr_scale=9: must be from 1.0 to 8.0"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "denoising_strength": 0},
     "invalid denoising_strength=0: must be above 0 for hires fix"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_sampler_name": "nope"}, "invalid hr_sampler_name='nope': valid"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_checkpoint_name": "sd15"},
     "invalid hr_checkpoint_name='sd15': is not the loaded model ('shapes-tiny')"),
    ("txt2img", {"prompt": "x", "enable_hr": True, "hr_scale": 8, "width": 64, "height": 64},
     "invalid width x height='512x512': is 262,144 pixels, more than the limit of 100,000"),
    ("txt2img", {"prompt": "x", "styles": ["nope"]}, "invalid style='nope': valid values are 'warm', 'blue', 'only negative'"),
    ("img2img", {"prompt": "x", "init_images": ["PIC"], "styles": ["warm", 3]}, "invalid styles=['warm', 3]: must be a list"),
]


@pytest.mark.parametrize(("endpoint", "body", "message"), BAD, ids=[f"{e}-{m[:30]}" for e, _, m in BAD])
def test_bad_input_is_a_422_with_one_line(server, monkeypatch, endpoint, body, message):
    monkeypatch.setenv("AIPAINT_MAX_PIXELS", "100000")
    body = json.loads(json.dumps(body).replace('"PIC"', json.dumps(b64(picture()))))
    reply = post(server, endpoint, {**SMALL, **body} if endpoint.endswith("2img") else body)
    assert reply.status_code == 422, reply.text
    error = reply.json()
    assert set(error) == {"error", "detail", "body", "errors"}
    assert message in error["detail"] and "\n" not in error["detail"]
    assert server.app.state.server.queue.waiting == 0  # refused before it waited


def test_without_a_styles_file_a_style_is_refused(tiny_pipe, tmp_path):
    running = Running(create_app(ServerConfig(model="m", output_dir=tmp_path), tiny_pipe))
    try:
        assert httpx.get(f"{running.url}/sdapi/v1/prompt-styles").json() == []
        reply = httpx.post(f"{running.url}/sdapi/v1/txt2img", json={"prompt": "x", "styles": ["a"], **SMALL})
        assert reply.status_code == 422
        assert reply.json()["detail"] == "invalid style='a': valid values are '(none: no styles file was given)'"
    finally:
        running.stop()
