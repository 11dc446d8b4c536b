"""aipaint serve: the A1111 API driven by the real A1111 client (webuiapi) on loopback, and
the bad-input rows of docs/serving.md with httpx."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")
uvicorn = pytest.importorskip("uvicorn")

from aipaint.serve.app import ServerConfig, create_app  # noqa: E402
from aipaint.serve.jobs import JobQueue, QueueFull  # noqa: E402

SMALL = dict(width=32, height=32, steps=2, cfg_scale=5.0, sampler_name="Euler")


class Running:
    """A uvicorn server in a thread, on a free loopback port, stopped by the fixture."""

    def __init__(self, app) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_sd_path) -> Path:
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_sd_path, folder / "tiny-a")
    shutil.copytree(tiny_sd_path, folder / "tiny-b")
    (folder / "loras").mkdir()
    return folder


@pytest.fixture(scope="module")
def server(models_dir, tiny_pipe, tmp_path_factory):
    config = ServerConfig(model=str(models_dir / "tiny-a"), models_dir=models_dir, lora_dir=models_dir / "loras",
                          output_dir=tmp_path_factory.mktemp("out"), queue_size=4, max_body_bytes=2 * 2**20)
    running = Running(create_app(config, tiny_pipe))
    yield running
    running.stop()


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def picture(colour=(200, 30, 30), size=32) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


# --------------------------------------------------------------------------- the A1111 client
def test_txt2img_through_webuiapi(api):
    result = api.txt2img(prompt="a red square", seed=3, batch_size=2, n_iter=2, **SMALL)
    assert len(result.images) == 4 and all(image.size == (32, 32) for image in result.images)
    assert result.info["all_seeds"] == [3, 4, 5, 6]
    assert "Steps: 2" in result.info["infotexts"][0] and "Seed: 3" in result.info["infotexts"][0]
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]
    # webuiapi sends fields aipaint does not act on: accepted, and named; those it acts on are not named
    assert {"tiling", "eta", "s_churn"} <= set(result.info["ignored_fields"])
    assert not {"restore_faces", "enable_hr", "hr_scale", "styles"} & set(result.info["ignored_fields"])
    again = api.txt2img(prompt="a red square", seed=3, **SMALL)
    # batch item 0 is the single image with its seed within one 8-bit level (docs/parameters.md, "What a seed
    # promises"): CPU kernels may round a batch of two differently from a batch of one
    diff = np.abs(np.asarray(again.image, dtype=int) - np.asarray(result.images[0], dtype=int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    other = api.txt2img(prompt="a red square", seed=4, **SMALL)  # the check can fail: another seed is far off
    assert np.abs(np.asarray(other.image, dtype=int) - np.asarray(result.images[0], dtype=int)).mean() > 10


def test_img2img_and_inpaint_through_webuiapi(api):
    source = picture()
    result = api.img2img(images=[source], prompt="a blue square", denoising_strength=0.5, seed=1, **SMALL)
    assert result.image.size == (32, 32)
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    painted = api.img2img(images=[source], mask_image=mask, inpaint_full_res=False, mask_blur=0, inpainting_fill=1,
                          prompt="blue", denoising_strength=1.0, seed=1, **SMALL)
    pixels = np.asarray(painted.image)
    assert np.array_equal(pixels[:, 20:], np.asarray(source)[:, 20:])  # outside the mask: untouched
    assert not np.array_equal(pixels[:, :16], np.asarray(source)[:, :16])


def test_png_info_reads_what_txt2img_wrote(api, server):
    image = api.txt2img(prompt="a green circle", seed=9, **SMALL).image
    reply = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": webuiapi.b64_img(image)}).json()
    assert reply["info"].startswith("a green circle")
    assert reply["parameters"]["Seed"] == "9" and reply["parameters"]["Prompt"] == "a green circle"


def test_lists(api, server):
    samplers = [s["name"] for s in api.get_samplers()]
    assert "Euler" in samplers and "DPM++ 2M" in samplers
    assert {"tiny-a", "tiny-b", "shapes-tiny"} <= {m["model_name"] for m in api.get_sd_models()}
    schedulers = {s["label"]: s["name"] for s in httpx.get(f"{server.url}/sdapi/v1/schedulers").json()}
    assert schedulers["Automatic"] == "automatic" and schedulers["SGM Uniform"] == "sgm_uniform"  # A1111's forms
    assert httpx.get(f"{server.url}/sdapi/v1/loras").json() == []
    assert "ram" in httpx.get(f"{server.url}/sdapi/v1/memory").json()
    assert httpx.get(f"{server.url}/sdapi/v1/cmd-flags").json()["queue_size"] == 4
    assert httpx.post(f"{server.url}/sdapi/v1/refresh-checkpoints").status_code == 200
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_options_switch_the_model(api, server):
    assert api.get_options()["sd_model_checkpoint"] == "tiny-a"
    before = server.app.state.server.pipeline
    api.set_options({"sd_model_checkpoint": "tiny-b"})
    try:
        assert api.get_options()["sd_model_checkpoint"] == "tiny-b"
        assert server.app.state.server.pipeline is not before
        assert api.txt2img(prompt="x", seed=1, **SMALL).image.size == (32, 32)
    finally:
        api.set_options({"sd_model_checkpoint": "tiny-a"})
    reply = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert reply.status_code == 422 and "valid values are" in reply.json()["detail"]


def _in_background(function):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", function()), daemon=True)
    thread.start()
    return thread, out


def _wait_for_step(server, least: int = 1) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        progress = httpx.get(f"{server.url}/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] >= least:
            return progress
        time.sleep(0.01)
    raise AssertionError("the job never reported a step")


def test_progress_with_a_preview_then_interrupt(api, server):
    thread, out = _in_background(lambda: api.txt2img(prompt="a red square", seed=2, n_iter=3, **{**SMALL, "steps": 200}))
    progress = _wait_for_step(server)
    assert progress["state"]["job_count"] == 3 and progress["state"]["sampling_steps"] == 200
    assert progress["textinfo"] == "txt2img 1/3"
    assert 0 < progress["progress"] < 1
    deadline = time.monotonic() + 10
    while progress["current_image"] is None and time.monotonic() < deadline:
        progress = httpx.get(f"{server.url}/sdapi/v1/progress").json()
    Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).verify()
    api.interrupt()
    thread.join(30)
    assert not thread.is_alive() and out["result"].images == []  # stopped in its first image
    assert httpx.get(f"{server.url}/sdapi/v1/progress").json()["state"]["job_count"] == 0


def _post_then_hang_up(server, path: str, body: dict) -> socket.socket:
    """A client that sends a request and will close its connection without reading the answer."""
    data = json.dumps(body).encode()
    client = socket.create_connection(("127.0.0.1", server.port))
    client.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return client


def _wait_until_idle(server, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while httpx.get(f"{server.url}/sdapi/v1/progress").json()["state"]["job_count"]:
        assert time.monotonic() < deadline, "the job went on after its client had gone"
        time.sleep(0.05)


def test_a_job_whose_client_hangs_up_stops(server, monkeypatch):
    pipeline = server.app.state.server.pipeline
    prompts: list[str] = []
    real_generate = pipeline.generate

    def generate(request, *args, **kwargs):
        prompts.append(request.prompt)
        return real_generate(request, *args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", generate)
    # Running: 50 images of 200 steps would take minutes; it stops within a few steps of the hang-up.
    client = _post_then_hang_up(server, "/sdapi/v1/txt2img", {"prompt": "x", "seed": 1, "n_iter": 50, **{**SMALL, "steps": 200}})
    _wait_for_step(server)
    client.close()
    _wait_until_idle(server)

    # Waiting: a job queued behind a running one, whose client hangs up, never runs.
    blocker = _post_then_hang_up(server, "/sdapi/v1/txt2img", {"prompt": "x", "seed": 1, "n_iter": 50, **{**SMALL, "steps": 200}})
    _wait_for_step(server)
    waiting = _post_then_hang_up(server, "/sdapi/v1/txt2img", {"prompt": "waiting", "seed": 1, **SMALL})
    deadline = time.monotonic() + 10
    while server.app.state.server.queue.waiting < 2:  # the running job and the waiting one
        assert time.monotonic() < deadline, "the second job never queued"
        time.sleep(0.02)
    waiting.close()
    time.sleep(0.5)  # a poll of its connection sees the hang-up while it still waits
    blocker.close()
    _wait_until_idle(server)
    assert server.app.state.server.queue.waiting == 0
    # The server still answers the next client; the job whose client left while it waited never ran.
    assert httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "after", **SMALL}, timeout=60).status_code == 200
    assert prompts[-1] == "after" and "waiting" not in prompts
    assert len(prompts) == 3  # one image of each 50-image job, then "after"


def test_skip_stops_the_current_image_and_goes_on(api, server):
    thread, out = _in_background(lambda: api.txt2img(prompt="x", seed=2, n_iter=2, **{**SMALL, "steps": 200}))
    _wait_for_step(server)
    api.skip()
    _wait_for_step(server)  # the second image runs
    while httpx.get(f"{server.url}/sdapi/v1/progress").json()["state"]["job_no"] != 1:
        time.sleep(0.01)
    api.interrupt()
    thread.join(30)
    assert out["result"].images == []


def test_jobs_take_turns_in_arrival_order():
    queue, order = JobQueue(max_queue=8), []

    def job(name):
        with queue.turn(name):
            order.append(name)

    with queue.turn("running"):
        threads = []
        for name in ("a", "b", "c", "d"):
            threads.append(threading.Thread(target=job, args=(name,)))
            threads[-1].start()
            while queue.waiting < len(threads) + 1:  # this one has its ticket before the next arrives
                time.sleep(0.001)
    for thread in threads:
        thread.join(5)
    assert order == ["a", "b", "c", "d"]


def test_a_refused_request_gives_up_its_place():
    queue = JobQueue(max_queue=4)
    refused, waiting = queue.ticket(), queue.ticket()
    queue.cancel(refused)
    with queue.turn("next", ticket=waiting) as state:  # would wait forever for the refused one
        assert state.job == "next"
    assert queue.waiting == 0


def test_concurrent_requests_each_get_their_own_answer(server):
    jobs = [_in_background(lambda i=i: httpx.post(f"{server.url}/sdapi/v1/txt2img",
                                                  json={"prompt": f"job {i}", "seed": i, **SMALL}, timeout=60))
            for i in range(3)]
    for thread, _ in jobs:
        thread.join(60)
    for i, (_, out) in enumerate(jobs):
        assert json.loads(out["result"].json()["info"])["all_seeds"] == [i]


def test_queue_refuses_past_its_size():
    queue = JobQueue(max_queue=1)
    with queue.turn("first"):
        with pytest.raises(QueueFull, match="holds 1 jobs"):
            with queue.turn("second"):
                pass
    with queue.turn("after"):
        pass


def test_controlnet_through_alwayson_scripts(api, tiny_pipe, tmp_path, monkeypatch):
    from test_controlnet import _tiny_controlnet

    _tiny_controlnet(tiny_pipe.model.unet, 1).save_pretrained(tmp_path / "tiny-cn")
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))
    plain = api.txt2img(prompt="a red square", seed=4, **SMALL)
    unit = webuiapi.ControlNetUnit(image=picture((0, 0, 255)), module="none", model="tiny-cn [12345678]", weight=1.0)
    controlled = api.txt2img(prompt="a red square", seed=4, controlnet_units=[unit], **SMALL)
    assert "ControlNet 0" in controlled.info["infotexts"][0]
    assert "Control Mode: Balanced" in controlled.info["infotexts"][0]
    unit.control_mode = 2
    stronger = api.txt2img(prompt="a red square", seed=4, controlnet_units=[unit], **SMALL)
    assert "Control Mode: ControlNet is more important" in stronger.info["infotexts"][0]
    assert not np.array_equal(np.asarray(plain.image), np.asarray(controlled.image))
    disabled = webuiapi.ControlNetUnit(image=picture(), model="tiny-cn", enabled=False)
    off = api.txt2img(prompt="a red square", seed=4, controlnet_units=[disabled], **SMALL)
    assert np.array_equal(np.asarray(plain.image), np.asarray(off.image))


def test_save_images_writes_only_under_the_output_folder(api, server):
    out = server.app.state.server.config.output_dir
    api.txt2img(prompt="x", seed=1, **SMALL)
    assert not any(out.rglob("*.png"))
    api.txt2img(prompt="x", seed=1, save_images=True, **SMALL)
    saved = list(out.rglob("*.png"))
    assert len(saved) == 1 and saved[0].parent == out / "txt2img-images"


def test_the_web_page_is_offline_and_calls_only_served_endpoints(server):
    import re

    reply = httpx.get(f"{server.url}/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    page = reply.text
    assert not re.search(r"https?://|src=[\"']//|href=[\"']//|@import", page)  # no network assets
    called = set(re.findall(r'api\("([\w-]+)"', page))
    assert {"progress", "interrupt", "skip", "png-info", "samplers"} <= called
    assert 'const kind = mode() === "txt2img" ? "txt2img" : "img2img"' in page and "api(kind, body)" in page
    called |= {"txt2img", "img2img"}
    served = {route.path.removeprefix("/sdapi/v1/") for route in server.app.routes}
    assert called <= served


# --------------------------------------------------------------------------- bad input (docs/serving.md)
def _bomb() -> str:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD = [
    ("txt2img", {"prompt": "x", "steps": -1}, 422, "invalid steps=-1: must be from 1 to 1000"),
    ("txt2img", {"prompt": "x", "width": 100000, "height": 100000}, 422, "invalid width=100000: must be from 16 to 4096"),
    ("txt2img", {"prompt": "x", "width": 4096, "height": 4096, "steps": 1}, 422, "more than the limit of 1,000,000"),
    ("txt2img", {"prompt": "x", "sampler_name": "nope"}, 422, "invalid sampler='nope': valid values are"),
    ("txt2img", {"prompt": "x", "batch_size": 65}, 422, "invalid batch_size=65: must be from 1 to 64"),
    ("txt2img", {"prompt": "x", "n_iter": 0}, 422, "invalid n_iter=0: must be an integer from 1 to 100"),
    ("txt2img", {"prompt": 5}, 422, "invalid prompt=5: must be a string"),
    ("txt2img", [1, 2], 422, "invalid body=[1, 2]: must be a JSON object"),
    ("txt2img", {"prompt": "x", "styles": 5}, 422, "invalid styles=5: must be a list of style names"),
    ("txt2img", {"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": [{"model": "../x", "image": "%%"}]}}}, 422,
     "cannot read ControlNet 0 image: it is not valid base64"),
    ("txt2img", {"prompt": "<lora:../../etc/passwd:1>", **SMALL}, 422, "invalid lora='../../etc/passwd'"),
    ("txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "tiny-b"}}, 422,
     "is not the loaded model ('tiny-a')"),
    ("img2img", {"prompt": "x", "init_images": ["%%%not base64"]}, 422,
     "cannot read init_images[0]: it is not valid base64"),
    ("img2img", {"prompt": "x", "init_images": [base64.b64encode(b"plain text").decode()]}, 422,
     "cannot read the image 'init_images[0]': cannot identify image file"),
    ("img2img", {"prompt": "x", "init_images": ["BOMB"]}, 422,
     "it has more than 89,478,485 pixels, the most aipaint decodes from a file"),
    ("img2img", {"prompt": "x"}, 422, "invalid init_images=None: must be a list of one base64-encoded image"),
    ("png-info", {"image": 12}, 422, "invalid image=12: must be a base64-encoded image"),
    ("options", {"CLIP_stop_at_last_layers": 99}, 422, "invalid CLIP_stop_at_last_layers=99: must be from 1 to 12"),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "message"), BAD, ids=[f"{e}-{m[:30]}" for e, _, _, m in BAD])
def test_bad_input_is_a_4xx_with_one_line(server, monkeypatch, endpoint, body, status, message):
    monkeypatch.setenv("AIPAINT_MAX_PIXELS", "1000000")
    if isinstance(body, dict) and body.get("init_images") == ["BOMB"]:
        body = {**body, "init_images": [_bomb()]}
    reply = httpx.post(f"{server.url}/sdapi/v1/{endpoint}", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert set(error) == {"error", "detail", "body", "errors"}
    assert message in error["detail"] and "\n" not in error["detail"] and "Traceback" not in reply.text


def test_a_control_model_name_leaving_its_folder(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))
    unit = {"model": "../../etc/passwd", "image": b64(picture())}
    reply = httpx.post(f"{server.url}/sdapi/v1/txt2img",
                       json={"prompt": "x", **SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert reply.status_code == 422, reply.text
    # the folder by its name, not its path: where the server keeps its files is no business of a client
    assert reply.json()["detail"].startswith("invalid ControlNet model='../../etc/passwd': must be a name inside "
                                             "CONTROLNET_DIR ('..', '.' and empty parts are not allowed)")
    assert str(tmp_path) not in reply.text and "\n" not in reply.json()["detail"]


def test_an_unexpected_error_is_500_without_a_traceback(server, monkeypatch):
    def broken():
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.app.state.server, "progress", broken)
    reply = httpx.get(f"{server.url}/sdapi/v1/progress")
    assert reply.status_code == 500
    assert reply.json()["detail"] == "internal error (RuntimeError); see the server's log"
    assert "secret" not in reply.text and "Traceback" not in reply.text


def test_bad_json_and_a_body_too_large(server):
    reply = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=b"{nope", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "is not valid JSON" in reply.json()["detail"]
    reply = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=b"x" * (2 * 2**20 + 1))
    assert reply.status_code == 413 and "larger than 2,097,152 bytes" in reply.json()["detail"]

    def chunks():
        for _ in range(3):
            yield b"x" * 2**20

    reply = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=chunks())  # no Content-Length: counted as it streams
    assert reply.status_code == 413


def test_values_are_checked_before_the_job_waits(server):
    with server.app.state.server.queue.turn("holding"):
        reply = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "nope"}, timeout=10)
    assert reply.status_code == 422 and "invalid sampler='nope'" in reply.json()["detail"]
    assert server.app.state.server.queue.waiting == 0  # the refused request gave its place up


def test_a_full_queue_is_503(tiny_pipe, tmp_path):
    running = Running(create_app(ServerConfig(model="m", output_dir=tmp_path, queue_size=1), tiny_pipe))
    try:
        with running.app.state.server.queue.turn("holding"):
            reply = httpx.post(f"{running.url}/sdapi/v1/txt2img", json={"prompt": "x", **SMALL})
        assert reply.status_code == 503 and "the server is busy: it holds 1 jobs" in reply.json()["detail"]
        assert httpx.post(f"{running.url}/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}).status_code == 200
    finally:
        running.stop()


def test_api_auth_and_cors(tiny_pipe, tmp_path):
    config = ServerConfig(model="m", api_auth=("user", "s3cret"), output_dir=tmp_path)
    running = Running(create_app(config, tiny_pipe))
    try:
        url = f"{running.url}/sdapi/v1/options"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, auth=("user", "wrong")).status_code == 401
        assert httpx.get(url, headers={"authorization": "Basic %%%"}).status_code == 401
        assert httpx.get(url, auth=("user", "s3cret")).status_code == 200
        # CORS is off unless configured: no header lets a browser page read the answer
        reply = httpx.get(url, auth=("user", "s3cret"), headers={"origin": "http://evil.example"})
        assert "access-control-allow-origin" not in reply.headers
    finally:
        running.stop()
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- the command
def test_aipaint_serve_passes_its_options_to_the_server(monkeypatch, tmp_path):
    import aipaint.serve.app as app_module
    from aipaint.cli.main import main

    started = {}
    monkeypatch.setattr(app_module, "serve", lambda config, host, port: started.update(config=config, host=host, port=port))
    assert main(["serve", "-m", "my-model", "--device", "cuda", "--dtype", "float16", "--api-auth", "me:pw",
                 "--models-dir", str(tmp_path), "--outdir", str(tmp_path / "out"), "--queue-size", "3",
                 "--max-body-mb", "5", "--cors-allow-origins", "https://a.example"]) == 0
    config = started["config"]
    assert (started["host"], started["port"]) == ("127.0.0.1", 7860)  # this machine only, by default
    assert config.model == "my-model" and config.api_auth == ("me", "pw") and config.models_dir == tmp_path
    assert config.output_dir == tmp_path / "out" and config.queue_size == 3 and config.max_body_bytes == 5 * 2**20
    assert config.cors_origins == ("https://a.example",)
    assert config.load_options["device"] == "cuda" and config.load_options["dtype"] == "float16"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--api-auth", "nocolon"], "expected USER:PASSWORD"),
    (["--queue-size", "0"], "invalid --queue-size=0: must be at least 1"),
    (["--port", "70000"], "invalid --port=70000: must be from 0 to 65535"),
])
def test_aipaint_serve_refuses_bad_options(args, message, capsys):
    from aipaint.cli.main import main

    try:
        code = main(["serve", *args])
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    assert code == 2 and message in capsys.readouterr().err
