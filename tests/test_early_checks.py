"""What fails before a model loads, fast, and quietly: parameter checks in the CLI and in
``aipaint.load()``, the offline download error, and a load that prints nothing."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

import aipaint
from aipaint.cli.main import main
from aipaint.errors import DownloadError, UnknownName
from aipaint.models import loading, zoo

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
# The hub client's own retries give up after about 23 s; the offline error must come long before.
FEW_SECONDS = 5.0


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was looked up or loaded before the parameters were checked")


def _point_hub_at(monkeypatch, endpoint: str, cache) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    # Download URLs are built from this template, made when the hub client was imported.
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    huggingface_hub.close_session()  # a session made earlier keeps the proxies it was made with


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """The Hub's endpoint is a loopback port nobody listens on, and the cache is empty: the tests
    never use the network, on a connected machine either."""
    import huggingface_hub

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound and never listening: a connection is refused at once
        _point_hub_at(monkeypatch, f"http://127.0.0.1:{closed.getsockname()[1]}", tmp_path / "hub")
        yield tmp_path / "hub"
    huggingface_hub.close_session()


def cache_file(cache, repo: str, filename: str, data: bytes):
    """Put ``filename`` of ``repo`` into a Hugging Face cache, as ``hf download`` leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


# --- offline -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "command"),
    [
        ("sd15", "`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 v1-5-pruned-emaonly.safetensors --local-dir"),
        ("someorg/some-model", "`hf download someorg/some-model --local-dir"),
    ],
)
def test_offline_download_fails_in_seconds_and_names_hf(unreachable_hub, tmp_path, capsys, model, command):
    started = time.perf_counter()
    code = main(["generate", "x", "-m", model, "-o", str(tmp_path / "x.png"), "--no-progress"])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2
    assert elapsed < FEW_SECONDS, f"the offline error took {elapsed:.1f} s"
    assert err.startswith("aipaint: error: could not download") and err.count("\n") == 1
    assert "cannot be reached" in err and "no copy is in the local cache" in err and "offline" in err
    assert command in err and "huggingface-cli" not in err


@pytest.mark.parametrize("offline_by", ["unreachable endpoint", "HF_HUB_OFFLINE"])
def test_without_the_hub_a_cached_download_is_used_at_once(unreachable_hub, monkeypatch, offline_by):
    if offline_by == "HF_HUB_OFFLINE":  # set after the hub client was imported: it is still honoured
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = cache_file(unreachable_hub, "someorg/cached-model", "weights.safetensors", b"weights")
    started = time.perf_counter()
    path = zoo.download_from_hub("someorg/cached-model", "weights.safetensors")
    assert time.perf_counter() - started < FEW_SECONDS
    assert path.read_bytes() == b"weights" and path.name == cached.name
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set" if offline_by == "HF_HUB_OFFLINE" else "cannot be reached"):
        zoo.download_from_hub("someorg/cached-model", "other.safetensors")


class AnswersEverything(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - the name http.server calls
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_reachable_hub_is_asked_as_before(tmp_path, monkeypatch):
    """The probe must not turn a connected machine into an offline one."""
    import huggingface_hub

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnswersEverything)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    asked = []

    def download(repo, filename, **kwargs):
        asked.append(kwargs)
        return str(cache_file(tmp_path / "hub", repo, filename, b"fresh"))

    try:
        _point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "hub")
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        assert zoo.download_from_hub("someorg/new-model", "weights.safetensors").read_bytes() == b"fresh"
    finally:
        server.shutdown()
        server.server_close()
        huggingface_hub.close_session()
    assert asked == [{"local_files_only": False}]


# --- parameters ----------------------------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(loading, "load_model", refuse_to_load)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "--sampler", "nope"], "invalid sampler='nope': valid values are 'Euler'"),
        (["generate", "x", "--sampler", "Euler a", "--schedule", "Karras"], "invalid schedule='Karras': sampler 'Euler a' supports"),
        (["generate", "x", "--schedule", "nope"], "invalid schedule='nope': valid values are 'Automatic'"),
        (["generate", "x --ar 16:9", "--mj", "--sampler", "nope"], "invalid sampler='nope'"),  # --ar would load for the size
        (["generate", "x", "--cfg", "40"], "invalid cfg_scale=40.0"),
        (["generate", "x", "--steps", "0"], "invalid steps=0"),
        (["generate", "x", "-W", "33"], "invalid width=33"),
        (["generate", "x", "--batch-size", "65"], "invalid batch_size=65"),
        (["img2img", "no-such-image.png", "x", "--sampler", "nope"], "invalid sampler='nope'"),
    ],
)
def test_cli_checks_parameters_before_the_model_loads(no_model_load, tmp_path, capsys, args, message):
    assert main([*args, "-o", str(tmp_path / "out.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aipaint: error: ") and message in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "float64"}, "invalid dtype='float64'"),
        ({"family": "nope"}, "invalid model family='nope'"),
        ({"runtime": "nope"}, "invalid runtime='nope'"),
    ],
)
def test_load_checks_names_before_finding_or_downloading_the_model(monkeypatch, options, message):
    monkeypatch.setattr(loading, "resolve_source", refuse_to_load)
    with pytest.raises(UnknownName, match=message):
        aipaint.load("sd15", **options)


# --- quiet loading -------------------------------------------------------------------------------
def test_loading_the_embedded_model_prints_nothing(capfd):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:  # as in a fresh session: a CLI test in this process turns them off for good
        library.enable_progress_bar()
    try:
        aipaint.load()
        assert capfd.readouterr() == ("", "")
        assert all(library.is_progress_bar_enabled() for library in libraries)  # the caller's setting is kept
    finally:
        for library, enabled in zip(libraries, before):
            (library.enable_progress_bar if enabled else library.disable_progress_bar)()
