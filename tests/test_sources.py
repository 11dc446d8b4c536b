"""Model sources (aipaint.sources, ``aipaint get/models/identify/triggers``): the real client
against HTTP servers these tests start on loopback. The API bodies have the shapes of Civitai's
and the Hugging Face Hub's public API documentation; the files are bytes made here."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from aipaint import sources
from aipaint.cli.main import main
from aipaint.errors import AipaintError, DownloadError, InvalidParameter, UnsafeFileError, UnsupportedFeature
from aipaint.plugin.kit.folders import NameOutsideFolder
from aipaint.sources import cards, civitai, huggingface
from aipaint.sources.client import Client
from aipaint.sources.downloader import confine

TOKEN = "civ-SECRET-token-0123456789"
HF_TOKEN = "hf_SECRETsecretSECRET42"


# --- the loopback servers -----------------------------------------------------------------------
@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    ranges: bool = False  # a file: honour Range requests
    cut_after: int | None = None  # send this many bytes of the body, then close the connection
    cuts: int = 0  # how many responses are cut


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class Server:
    """A threading HTTP server on 127.0.0.1 with routes by path (query included or not)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                app.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = app.routes.get(self.path) or app.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self._send(404, b'{"error":"Not found"}', {"Content-Type": "application/json"})
                    return
                body, status, headers = route.body, route.status, dict(route.headers)
                wanted = self.headers.get("Range")
                if route.ranges and wanted and wanted.startswith("bytes="):
                    start = int(wanted[6:].split("-", 1)[0])
                    if start >= len(body):
                        self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                        return
                    headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                    body, status = body[start:], 206
                if route.ranges:
                    headers.setdefault("Accept-Ranges", "bytes")
                if route.cuts > 0 and route.cut_after is not None:
                    route.cuts -= 1
                    self.send_response(status)
                    for key, value in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body[: route.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(status, body, headers)

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def json(self, path: str, data: Any, status: int = 200) -> None:
        self.routes[path] = Route(status, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def file(self, path: str, data: bytes, **options: Any) -> Route:
        route = Route(200, data, {"Content-Type": "application/octet-stream"}, ranges=True, **options)
        self.routes[path] = route
        return route

    def redirect(self, path: str, location: str) -> None:
        self.routes[path] = Route(302, b"", {"Location": location})

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub(servers, monkeypatch):
    """The Hugging Face Hub's API, on a loopback server of its own."""
    server = Server()
    monkeypatch.setenv("AIPAINT_HF_ENDPOINT", server.url)
    yield server
    server.close()


@pytest.fixture
def servers(monkeypatch, tmp_path):
    """(api, cdn): the API host (Civitai and the Hub both point here) and a storage host it redirects to."""
    api, cdn = Server(), Server()
    home = tmp_path / "home"
    monkeypatch.setenv("AIPAINT_HOME", str(home))
    monkeypatch.setenv("AIPAINT_CIVITAI_BASE_URL", api.url)
    monkeypatch.setenv("AIPAINT_HF_ENDPOINT", api.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("CIVITAI_API_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "AIPAINT_LORA_DIR",
                 "AIPAINT_EMBEDDINGS_DIR", "AIPAINT_CHECKPOINT_DIR", "AIPAINT_VAE_DIR", "AIPAINT_CONTROLNET_DIR",
                 "AIPAINT_UPSCALER_DIR", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    yield api, cdn
    api.close()
    cdn.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(n: int = 300_000, seed: int = 1) -> bytes:
    out = bytearray()
    block = str(seed).encode()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def civitai_file(name: str, data: bytes, url: str, *, fmt: str = "SafeTensor", primary: bool = True,
                 file_id: int = 501, sha256: str | None = None) -> dict[str, Any]:
    digest = sha256 or sha(data)
    return {"id": file_id, "name": name, "type": "Model", "sizeKB": len(data) / 1024,
            "metadata": {"format": fmt, "size": "pruned", "fp": "fp16"}, "pickleScanResult": "Success",
            "virusScanResult": "Success",
            "hashes": {"AutoV1": "4748A7F6", "AutoV2": digest[:10].upper(), "SHA256": digest.upper(),
                       "CRC32": "DAEE95B7", "BLAKE3": "1A411D9B"},
            "downloadUrl": url, "primary": primary}


def civitai_model(api: Server, *, model_id: int = 100, version_id: int = 200, model_type: str = "LORA",
                  base: str = "SD 1.5", files: list[dict[str, Any]], words: tuple[str, ...] = ("inkstyle",)) -> None:
    version = {"id": version_id, "modelId": model_id, "name": "v1.0", "baseModel": base, "baseModelType": "Standard",
               "air": f"urn:air:sd1:lora:civitai:{model_id}@{version_id}", "status": "Published",
               "trainedWords": list(words), "stats": {"downloadCount": 5}, "files": files, "images": [],
               "downloadUrl": f"{api.url}/api/download/models/{version_id}",
               "model": {"name": "Ink Style", "type": model_type, "nsfw": False, "poi": False}}
    model = {"id": model_id, "name": "Ink Style", "description": "<p>ink</p>", "type": model_type, "poi": False,
             "nsfw": False, "allowNoCredit": True, "allowCommercialUse": ["Image", "Rent"], "allowDerivatives": True,
             "allowDifferentLicense": True, "tags": ["style", "ink"], "creator": {"username": "someone"},
             "modelVersions": [{k: v for k, v in version.items() if k not in ("modelId", "model")}]}
    api.json(f"/api/v1/models/{model_id}", model)
    api.json(f"/api/v1/model-versions/{version_id}", version)
    for entry in files:
        for key in ("AutoV2", "SHA256"):
            api.json(f"/api/v1/model-versions/by-hash/{entry['hashes'][key]}", version)


def lora_setup(api: Server, cdn: Server, data: bytes, name: str = "ink_style.safetensors", **options: Any) -> Route:
    """A Civitai LoRA whose download redirects (as Civitai's does) to a storage host."""
    civitai_model(api, files=[civitai_file(name, data, f"{api.url}/api/download/models/200")], **options)
    api.redirect("/api/download/models/200", f"{cdn.url}/files/{name}?X-Amz-Signature=sig123&token=leaky")
    return cdn.file(f"/files/{name}", data)


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- references --------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "model", "version"), [
    ("https://civitai.com/models/12345", 12345, None),
    ("https://civitai.com/models/12345/ink-style?modelVersionId=67890", 12345, 67890),
    ("https://civitai.com/api/download/models/67890", None, 67890),
    ("https://civitai.com/api/v1/model-versions/67890", None, 67890),
    ("urn:air:sd1:lora:civitai:12345@67890", 12345, 67890),
    ("urn:air:sdxl:checkpoint:civitai:12345", 12345, None),
    ("civitai:12345@67890", 12345, 67890),
])
def test_civitai_references(text, model, version):
    ref = civitai.parse(text)
    assert (ref.model_id, ref.version_id) == (model, version)


def test_air_kind_and_bad_references():
    assert civitai.parse("urn:air:sd1:lora:civitai:1@2").air_kind == "lora"
    assert civitai.parse("urn:air:sd1:embedding:civitai:1@2").air_kind == "embedding"
    with pytest.raises(UnsupportedFeature, match="AIR source"):
        civitai.parse("urn:air:sd1:lora:openai:1@2")
    with pytest.raises(InvalidParameter, match="not a model link"):
        civitai.parse("https://civitai.com/user/someone")
    with pytest.raises(InvalidParameter, match="not a number"):
        civitai.parse("https://civitai.com/models/abc")
    assert civitai.parse("https://example.com/models/1") is None


@pytest.mark.parametrize(("text", "repo", "path", "rev"), [
    ("https://huggingface.co/org/ink-lora", "org/ink-lora", None, "main"),
    ("https://huggingface.co/org/ink-lora/blob/main/ink.safetensors", "org/ink-lora", "ink.safetensors", "main"),
    ("https://huggingface.co/org/ink-lora/resolve/v2/sub/ink.safetensors?download=true", "org/ink-lora", "sub/ink.safetensors", "v2"),
    ("https://hf.co/org/ink-lora/tree/dev", "org/ink-lora", None, "dev"),
    ("hf:org/ink-lora/ink.safetensors", "org/ink-lora", "ink.safetensors", "main"),
])
def test_hub_references(text, repo, path, rev):
    assert huggingface.parse(text) == huggingface.HubRef(repo, path, rev)


def test_hub_references_refused():
    with pytest.raises(UnsupportedFeature, match="dataset"):
        huggingface.parse("https://huggingface.co/datasets/org/data")
    with pytest.raises(InvalidParameter):
        huggingface.parse("https://huggingface.co/org/x/resolve/main/../../etc/passwd")
    assert not sources.is_source("just words") and sources.is_source("civitai:1") and sources.is_source("a" * 64)


@pytest.mark.parametrize("name", [
    "../../evil.safetensors", "/etc/evil.safetensors", "sub/evil.safetensors", "..\\evil.safetensors",
    ".hidden.safetensors", "evil\x00.safetensors", "evil\n.safetensors", "C:\\evil.safetensors", "~/evil.safetensors",
    "x" * 300 + ".safetensors", "evil.exe",
])
def test_a_name_from_a_source_stays_in_its_folder(tmp_path, name):
    with pytest.raises(InvalidParameter):
        confine(name, tmp_path / "loras", "LoRA")


def test_a_link_in_place_of_the_file_is_refused(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "ink.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(NameOutsideFolder):
        confine("ink.safetensors", folder, "LoRA")
    assert confine("ok.safetensors", folder, "LoRA") == folder / "ok.safetensors"
    assert confine("style/ok.safetensors", folder, "LoRA", allow_subfolders=True) == folder / "style" / "ok.safetensors"
    with pytest.raises(UnsafeFileError, match="allow-pickle"):
        confine("ok.pt", folder, "LoRA")


# --- downloads ------------------------------------------------------------------------------------
def test_get_a_civitai_lora_with_its_card(servers, tmp_path):
    api, cdn = servers
    data = payload()
    lora_setup(api, cdn, data)
    seen: list[tuple[int, int]] = []
    result = sources.get("urn:air:sd1:lora:civitai:100@200", progress=lambda done, total: seen.append((done, total)))
    home = tmp_path / "home"
    assert result.path == home / "loras" / "ink_style.safetensors" and result.downloaded
    assert result.path.read_bytes() == data
    card = json.loads((home / "loras" / "ink_style.aipaint.json").read_text())
    assert card["sha256"] == sha(data) and card["autov2"] == sha(data)[:10].upper()
    assert card["base_model"] == "SD 1.5" and card["family"] == "sd15" and card["trigger_words"] == ["inkstyle"]
    assert card["kind"] == "lora" and card["link"] == f"{api.url}/models/100?modelVersionId=200"
    assert "commercial use: Image, Rent" in card["license"] and card["ids"]["civitai_version"] == 200
    assert seen[-1] == (len(data), len(data)) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    assert everything_under(home / "loras") == ["ink_style.aipaint.json", "ink_style.safetensors"]
    # Asked again, the installed file is found by its card: nothing more is fetched.
    before = len(api.seen) + len(cdn.seen)
    assert sources.ensure("civitai:100@200") == result.path
    assert sources.ensure("urn:air:sd1:lora:civitai:100@200") == result.path
    assert len(api.seen) + len(cdn.seen) == before


def test_a_cut_connection_resumes_with_a_range_request(servers, tmp_path):
    api, cdn = servers
    data = payload(400_000)
    route = lora_setup(api, cdn, data)
    route.cut_after, route.cuts = 150_000, 1
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        sources.get("civitai:100@200", retries=0, backoff_s=0)
    folder = tmp_path / "home" / "loras"
    parts = [p for p in folder.iterdir() if p.name.endswith(".part")]
    kept = parts[0].stat().st_size if len(parts) == 1 else None
    assert kept and kept <= 150_000 and not (folder / "ink_style.safetensors").exists()
    assert parts[0].read_bytes() == data[:kept]
    result = sources.get("civitai:100@200", retries=0, backoff_s=0)
    assert result.path.read_bytes() == data
    assert cdn.seen[-1].headers.get("range") == f"bytes={kept}-"
    assert everything_under(folder) == ["ink_style.aipaint.json", "ink_style.safetensors"]


def test_a_cut_is_retried_within_one_call(servers):
    api, cdn = servers
    data = payload(250_000)
    route = lora_setup(api, cdn, data)
    route.cut_after, route.cuts = 100_000, 2
    result = sources.get("civitai:100@200", retries=3, backoff_s=0)
    assert result.path.read_bytes() == data
    ranges = [s.headers.get("range") for s in cdn.seen]
    assert len(ranges) == 3 and ranges[0] is None
    starts = [int(r[6:-1]) for r in ranges[1:]]
    assert 0 < starts[0] <= 100_000 < starts[1] <= starts[0] + 100_000


def test_a_server_that_ignores_range_starts_over(servers):
    api, cdn = servers
    data = payload(200_000)
    route = lora_setup(api, cdn, data)
    route.cut_after, route.cuts, route.ranges = 50_000, 1, False
    result = sources.get("civitai:100@200", retries=1, backoff_s=0)
    assert result.path.read_bytes() == data


def test_a_wrong_sha256_is_refused_and_nothing_is_left(servers, tmp_path):
    api, cdn = servers
    data = payload()
    civitai_model(api, files=[civitai_file("ink_style.safetensors", data, f"{cdn.url}/f", sha256=sha(b"other"))])
    cdn.file("/f", data)
    with pytest.raises(DownloadError, match="was expected; it was deleted"):
        sources.get("civitai:100")
    assert everything_under(tmp_path / "home") == ["loras"]


def test_a_name_that_tries_to_leave_its_folder_is_refused(servers, tmp_path):
    api, cdn = servers
    data = payload(1000)
    civitai_model(api, files=[civitai_file("../../escaped.safetensors", data, f"{cdn.url}/f")])
    cdn.file("/f", data)
    assert main(["get", "civitai:100", "--no-progress"]) == 2
    assert not list(tmp_path.rglob("escaped.safetensors")) and cdn.seen == []


def test_safetensors_are_preferred_and_pickles_need_consent(servers, tmp_path):
    api, cdn = servers
    safe, pickle_bytes = payload(1000, 2), payload(1000, 3)
    civitai_model(api, files=[civitai_file("ink.pt", pickle_bytes, f"{cdn.url}/pt", fmt="PickleTensor", file_id=1),
                              civitai_file("ink.safetensors", safe, f"{cdn.url}/st", primary=False, file_id=2)])
    cdn.file("/pt", pickle_bytes)
    cdn.file("/st", safe)
    assert sources.get("civitai:100").path.name == "ink.safetensors"
    civitai_model(api, model_id=101, version_id=201,
                  files=[civitai_file("old.pt", pickle_bytes, f"{cdn.url}/pt", fmt="PickleTensor")])
    with pytest.raises(UnsafeFileError, match="allow-pickle"):
        sources.get("civitai:101")
    assert not (tmp_path / "home" / "loras" / "old.pt").exists()
    assert sources.get("civitai:101", allow_pickle=True).path.read_bytes() == pickle_bytes


def test_kinds_go_to_their_folders(servers, tmp_path):
    api, cdn = servers
    data = payload(2000)
    civitai_model(api, model_type="TextualInversion", files=[civitai_file("neg.safetensors", data, f"{cdn.url}/f")])
    cdn.file("/f", data)
    assert sources.get("civitai:100").path == tmp_path / "home" / "embeddings" / "neg.safetensors"
    with pytest.raises(InvalidParameter, match="TextualInversion"):
        sources.get("civitai:100", kind="checkpoint")


def test_an_existing_different_file_is_kept_unless_forced(servers, tmp_path):
    api, cdn = servers
    data = payload(5000)
    lora_setup(api, cdn, data)
    folder = tmp_path / "home" / "loras"
    folder.mkdir(parents=True)
    (folder / "ink_style.safetensors").write_bytes(b"mine")
    with pytest.raises(DownloadError, match="already exists and is another file"):
        sources.get("civitai:100")
    assert (folder / "ink_style.safetensors").read_bytes() == b"mine"
    assert sources.get("civitai:100", force=True).path.read_bytes() == data
    again = sources.get("civitai:100")
    assert not again.downloaded


def test_get_by_hash_looks_the_file_up_on_civitai(servers, tmp_path):
    api, cdn = servers
    data = payload(3000)
    lora_setup(api, cdn, data)
    result = sources.get(sha(data)[:10].upper())
    assert result.path.read_bytes() == data
    assert f"/api/v1/model-versions/by-hash/{sha(data)[:10].upper()}" in api.paths()


# --- tokens --------------------------------------------------------------------------------------
def test_the_token_goes_to_civitai_only_and_is_never_shown(servers, tmp_path, monkeypatch, capsys):
    api, cdn = servers
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    data = payload(4000)
    lora_setup(api, cdn, data)
    assert main(["get", "civitai:100@200", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err and "installed: LoRA" in out.out and "inkstyle" in out.out
    assert all(s.headers.get("authorization") == f"Bearer {TOKEN}" for s in api.seen)
    assert cdn.seen and all("authorization" not in s.headers for s in cdn.seen)
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes()


def test_a_refused_token_is_not_echoed(servers, tmp_path, monkeypatch, capsys):
    api, cdn = servers
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tokens.json").write_text(json.dumps({"civitai": TOKEN}))
    # The server echoes what it was sent, in the body and in a redirect's query.
    api.routes["/api/v1/models/100"] = Route(401, f'{{"error": "bad token Bearer {TOKEN}"}}'.encode())
    assert main(["get", "civitai:100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aipaint: error:") and "HTTP 401" in err and "CIVITAI_API_TOKEN" in err
    assert TOKEN not in err and "\n" not in err.strip()
    assert api.seen[0].headers["authorization"] == f"Bearer {TOKEN}"  # read from the token file
    lora_setup(api, cdn, payload(100))
    api.redirect("/api/v1/models/100", f"{cdn.url}/err?token={TOKEN}")
    cdn.routes["/err"] = Route(500, TOKEN.encode())
    assert main(["get", "civitai:100"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 500" in err and TOKEN not in err


def test_scrub_hides_tokens_queries_and_passwords(monkeypatch):
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    client = Client()
    assert client.use_token("civitai")
    text = client.scrub(f"x {TOKEN} Authorization: Bearer abc https://u:pw@h/p?token=zz&a=b")
    assert TOKEN not in text and "abc" not in text and "pw" not in text and "zz" not in text


# --- the Hub and plain URLs ---------------------------------------------------------------------
def hub_repo(api: Server, cdn: Server, data: bytes, *, tags: tuple[str, ...] = ("diffusers", "lora")) -> None:
    api.json("/api/models/org/ink-lora", {
        "_id": "x", "id": "org/ink-lora", "modelId": "org/ink-lora", "author": "org", "sha": "abc123", "private": False,
        "gated": False, "pipeline_tag": "text-to-image", "tags": [*tags, "license:openrail++"], "library_name": "diffusers",
        "cardData": {"license": "openrail++", "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
                     "instance_prompt": "a photo in sks ink style", "tags": ["lora"]},
        "siblings": [{"rfilename": "README.md"}, {"rfilename": "pytorch_lora_weights.safetensors"}]})
    api.json("/api/models/org/ink-lora/tree/main", [
        {"type": "file", "oid": "9a8b" * 10, "size": 120, "path": "README.md"},
        {"type": "file", "oid": "1f2e" * 10, "size": len(data), "path": "pytorch_lora_weights.safetensors",
         "lfs": {"oid": sha(data), "size": len(data), "pointerSize": 134}},
    ])
    api.redirect("/org/ink-lora/resolve/main/pytorch_lora_weights.safetensors",
                 f"{cdn.url}/xet/blob?X-Amz-Signature=s")
    cdn.file("/xet/blob", data)


def test_get_from_a_hub_repo(servers, hub, tmp_path, monkeypatch):
    api, cdn = servers
    api = hub
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    data = payload(6000)
    hub_repo(api, cdn, data)
    result = sources.get(f"{api.url}/org/ink-lora")
    assert result.path == tmp_path / "home" / "loras" / "pytorch_lora_weights.safetensors"
    assert result.card["family"] == "sdxl" and result.card["trigger_words"] == ["a photo in sks ink style"]
    assert result.card["license"] == "openrail++"
    assert api.seen[0].headers["authorization"] == f"Bearer {HF_TOKEN}"
    assert all("authorization" not in s.headers for s in cdn.seen)
    assert sources.ensure("hf:org/ink-lora/pytorch_lora_weights.safetensors") == result.path


def test_hub_repo_without_a_kind_tag_needs_one(servers, hub):
    api, cdn = servers
    api = hub
    data = payload(100)
    hub_repo(api, cdn, data, tags=())
    api.json("/api/models/org/ink-lora", {"id": "org/ink-lora", "tags": [], "cardData": {}})
    with pytest.raises(InvalidParameter, match="--kind"):
        sources.get("hf:org/ink-lora")
    assert sources.get("hf:org/ink-lora", kind="vae").path.parent.name == "vae"


def test_plain_url_needs_a_sha256_and_gets_no_token(servers, tmp_path, monkeypatch):
    api, cdn = servers
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    data = payload(700)
    cdn.file("/models/4x-Thing.safetensors", data)
    with pytest.raises(InvalidParameter, match="sha256"):
        sources.get(f"{cdn.url}/models/4x-Thing.safetensors", kind="upscaler")
    with pytest.raises(InvalidParameter, match="kind"):
        sources.get(f"{cdn.url}/models/4x-Thing.safetensors#sha256={sha(data)}")
    result = sources.get(f"{cdn.url}/models/4x-Thing.safetensors#sha256={sha(data)}", kind="upscaler")
    assert result.path == tmp_path / "home" / "upscalers" / "4x-Thing.safetensors"
    assert all("authorization" not in s.headers for s in cdn.seen)


def test_unreachable_host_is_one_clear_line(servers, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AIPAINT_CIVITAI_BASE_URL", f"http://127.0.0.1:{port}")
    assert main(["get", "https://civitai.com/models/5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aipaint: error: could not reach 127.0.0.1") and "offline" in err
    assert "\n" not in err and "Traceback" not in err


# --- cards, identify, models, triggers, base models ----------------------------------------------
def test_identify_a_local_file_by_its_autov2_hash(servers, tmp_path, capsys):
    api, cdn = servers
    data = payload(9000)
    civitai_model(api, files=[civitai_file("ink_style.safetensors", data, f"{cdn.url}/f")])
    mine = tmp_path / "home" / "loras" / "my_ink.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(data)
    assert main(["identify", str(mine)]) == 0
    assert "Ink Style v1.0" in capsys.readouterr().out
    assert f"/api/v1/model-versions/by-hash/{sha(data)[:10].upper()}" in api.paths()
    card = cards.read_card(mine)
    assert card["file"] == "my_ink.safetensors" and card["published_name"] == "ink_style.safetensors"
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [{**listed[0], "kind": "lora", "name": "my_ink", "family": "sd15", "trigger_words": ["inkstyle"],
                       "has_card": True}]
    # A file whose AutoV2 matches but whose sha256 does not is not that file.
    other = tmp_path / "other.safetensors"
    other.write_bytes(payload(10, 9))
    civitai_model(api, model_id=7, version_id=8, files=[civitai_file(
        "x.safetensors", b"", f"{cdn.url}/f", sha256=sha(other.read_bytes())[:10] + "0" * 54)])
    with pytest.raises(DownloadError, match="not that file"):
        sources.identify(other)


def test_models_lists_files_without_cards(servers, tmp_path, capsys):
    folder = tmp_path / "home" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "mine.safetensors").write_bytes(b"x")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "mine" in out and "aipaint identify" in out


def test_trigger_words_are_added_on_request(servers, capsys):
    api, cdn = servers
    lora_setup(api, cdn, payload(500))
    sources.get("civitai:100")
    prompt, added = sources.prompt_with_trigger_words("<lora:ink_style:0.8> a cat, <lora:unknown:1>")
    assert prompt == "inkstyle, <lora:ink_style:0.8> a cat, <lora:unknown:1>" and added == ["inkstyle"]
    assert sources.add_trigger_words("inkstyle, a cat", ["inkstyle"]) == "inkstyle, a cat"
    assert main(["triggers", "a cat <lora:ink_style:1>"]) == 0
    assert capsys.readouterr().out.strip() == "inkstyle, a cat <lora:ink_style:1>"
    with pytest.raises(AipaintError, match="must be a Civitai model link"):
        sources.resolve_source("")


@pytest.mark.parametrize(("base", "family"), [
    ("SD 1.5", "sd15"), ("SD 1.4", "sd15"), ("SDXL 1.0", "sdxl"), ("Pony", "sdxl"), ("Illustrious", "sdxl"),
    ("SD 2.1 Unclip", "stable-unclip"), ("SD 2.1 768", "sd2"), ("Flux.1 D", "flux"), ("black-forest-labs/FLUX.1-dev", "flux"), ("Flux.2 D", "flux2"), ("SD 3.5 Large", "sd3"),
    ("Pony V7", "auraflow"), ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"), ("Other", None), ("", None),
])
def test_base_models_map_to_families(base, family):
    assert cards.family_of_base_model(base) == family


def test_a_lora_for_another_family_is_a_clear_warning(tmp_path):
    lora = tmp_path / "ink.safetensors"
    lora.write_bytes(b"x")
    assert cards.lora_base_model_warning(lora, "sdxl") is None  # no card: nothing to say
    cards.write_card(lora, {"kind": "lora", "file": lora.name, "base_model": "SD 1.5", "family": "sd15"})
    message = cards.lora_base_model_warning(lora, "sdxl")
    assert message == ("LoRA ink was made for SD 1.5 (sd15), but the loaded model is sdxl: "
                       "expect it to fail to apply or to spoil the image")
    assert cards.lora_base_model_warning(lora, "sd15") is None and cards.lora_base_model_warning(lora, "sd1") is None
    cards.write_card(lora, {"kind": "lora", "base_model": "Other"})
    assert cards.lora_base_model_warning(lora, "sdxl") is None


# --- sources wherever a LoRA, ControlNet or upscaler is named ---------------------------------------
def test_a_lora_named_by_its_source_is_installed_once_and_used(servers, tmp_path):
    from aipaint_plugins.lora.library import lora_folder

    api, cdn = servers
    data = payload(700)
    lora_setup(api, cdn, data)
    found = lora_folder().resolve("urn:air:sd1:lora:civitai:100@200")
    assert found.path == tmp_path / "home" / "loras" / "ink_style.safetensors" and found.name == "ink_style"
    assert found.path.read_bytes() == data
    before = len(api.seen) + len(cdn.seen)
    assert lora_folder().resolve("civitai:100@200").path == found.path  # installed: found by its card
    assert lora_folder().resolve("ink_style").path == found.path  # and by its name, as any LoRA
    assert len(api.seen) + len(cdn.seen) == before


def test_a_lora_named_by_hash_is_local_first_then_fetched(servers, tmp_path):
    from aipaint_plugins.lora.library import lora_folder

    api, cdn = servers
    data = payload(900, seed=3)
    lora_setup(api, cdn, data)
    autov2 = sha(data)[:10]
    folder = tmp_path / "home" / "loras"
    folder.mkdir(parents=True)
    (folder / f"{autov2}.safetensors").write_bytes(b"local")  # a local file of that name wins: nothing fetched
    assert lora_folder().resolve(autov2).path.read_bytes() == b"local" and not api.seen
    (folder / f"{autov2}.safetensors").unlink()
    found = lora_folder().resolve(autov2.upper())  # as A1111 records LoRA hashes in the PNG
    assert found.path == folder / "ink_style.safetensors" and found.path.read_bytes() == data
    with pytest.raises(AipaintError):  # a plain unknown name is still the usual error, and asks nobody
        n = len(api.seen)
        lora_folder().resolve("no_such_lora")
    assert len(api.seen) == n


def test_a_source_never_bypasses_the_folder_checks(servers, tmp_path):
    from aipaint_plugins.lora.library import lora_folder

    with pytest.raises(AipaintError, match="inside"):
        lora_folder().resolve("../secrets")
    assert not servers[0].seen


def test_a_controlnet_and_an_upscaler_named_by_their_source(servers, tmp_path):
    from aipaint_plugins.controlnet.models import resolve

    from aipaint.plugin.kit.image_models import resolve_weights

    api, cdn = servers
    cn = payload(400, seed=5)
    civitai_model(api, model_id=300, version_id=400, model_type="Controlnet",
                  files=[civitai_file("layout_cn.safetensors", cn, f"{cdn.url}/files/layout_cn.safetensors")])
    cdn.file("/files/layout_cn.safetensors", cn)
    ref = resolve("civitai:300@400")
    assert ref.path == tmp_path / "home" / "controlnet" / "layout_cn.safetensors" and ref.path.read_bytes() == cn
    up = payload(500, seed=6)
    cdn.file("/files/x2.safetensors", up)
    path = resolve_weights(f"{cdn.url}/files/x2.safetensors#sha256={sha(up)}")
    assert path == tmp_path / "home" / "upscalers" / "x2.safetensors" and path.read_bytes() == up
    with pytest.raises(AipaintError, match="sha256"):  # a plain URL without its hash is refused, as by `get`
        resolve_weights(f"{cdn.url}/files/other.safetensors")


def test_generation_commands_add_trigger_words_on_request(servers, capsys):
    from aipaint.cli.api import build_request
    from aipaint.cli.main import build_parser

    api, cdn = servers
    lora_setup(api, cdn, payload(500))
    sources.get("civitai:100")
    parser = build_parser()
    plain = build_request(parser.parse_args(["generate", "a cat <lora:ink_style:0.8>"]))
    assert plain.prompt == "a cat <lora:ink_style:0.8>"  # only on request
    asked = build_request(parser.parse_args(["generate", "a cat <lora:ink_style:0.8>", "--trigger-words"]))
    assert asked.prompt == "inkstyle, a cat <lora:ink_style:0.8>"
    assert "trigger words added: inkstyle" in capsys.readouterr().err
    again = build_request(parser.parse_args(["generate", "inkstyle, a cat <lora:ink_style:1>", "--trigger-words"]))
    assert again.prompt == "inkstyle, a cat <lora:ink_style:1>"  # a word already there is not added twice
