"""The web page at ``/``: txt2img, img2img and inpainting with a mask brush, progress with the
live preview and an interrupt button, a gallery, and PNG info by dropping a file.

One self-contained HTML document that calls the server's own ``/sdapi/v1`` API: no network
assets (scripts, fonts, styles) so it works offline; kept in a module so it installs with the
package.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>aipaint</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:1em;max-width:1100px}
fieldset{border:1px solid #ccc;margin:.5em 0}label{display:inline-block;margin:.2em .6em .2em 0}
textarea{width:100%;height:4em}#gallery img{width:128px;margin:2px;cursor:pointer;image-rendering:pixelated}
#canvases{position:relative;display:inline-block}#canvases canvas{position:absolute;left:0;top:0}
#maskc{opacity:.5;cursor:crosshair}#err{color:#b00}#preview{width:256px;image-rendering:pixelated}
#drop{border:2px dashed #aaa;padding:1em;margin:.5em 0}pre{white-space:pre-wrap}
</style></head><body>
<h1>aipaint</h1>
<fieldset><legend>Mode</legend>
<label><input type="radio" name="mode" value="txt2img" checked> txt2img</label>
<label><input type="radio" name="mode" value="img2img"> img2img</label>
<label><input type="radio" name="mode" value="inpaint"> inpaint</label></fieldset>
<textarea id="prompt" placeholder="prompt">a big red circle on the left, on a white background</textarea>
<textarea id="negative" placeholder="negative prompt"></textarea>
<fieldset><legend>Parameters</legend>
<label>sampler <select id="sampler"></select></label>
<label>steps <input id="steps" type="number" value="20" min="1" max="1000"></label>
<label>CFG <input id="cfg" type="number" value="7" step="0.5" min="1" max="30"></label>
<label>width <input id="width" type="number" value="512" step="8"></label>
<label>height <input id="height" type="number" value="512" step="8"></label>
<label>seed <input id="seed" type="number" value="-1"></label>
<label>batch size <input id="batch" type="number" value="1" min="1" max="64"></label>
<label>batch count <input id="niter" type="number" value="1" min="1" max="100"></label>
<label>denoising <input id="denoise" type="number" value="0.75" step="0.05" min="0" max="1"></label>
</fieldset>
<fieldset id="imagebox" hidden><legend>Image (img2img / inpaint)</legend>
<input type="file" id="initfile" accept="image/*">
<label>brush <input id="brush" type="range" min="2" max="64" value="16"></label>
<button id="clearmask">clear mask</button><br>
<div id="canvases"><canvas id="imgc"></canvas><canvas id="maskc"></canvas></div></fieldset>
<p><button id="go">Generate</button> <button id="stop">Interrupt</button> <button id="skip">Skip</button>
<span id="status"></span></p>
<div id="err"></div>
<img id="preview" alt="">
<h2>Gallery</h2><div id="gallery"></div><pre id="info"></pre>
<h2>PNG info</h2><div id="drop">drop a PNG here</div><pre id="pnginfo"></pre>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const api = (path, body) => fetch("/sdapi/v1/" + path, body === undefined ? {} :
  {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)})
  .then(async (r) => { const j = await r.json().catch(() => null);
    if (!r.ok) throw new Error(j && j.detail ? j.detail : r.status + " " + r.statusText); return j; });
const mode = () => document.querySelector("input[name=mode]:checked").value;
document.querySelectorAll("input[name=mode]").forEach((e) => e.onchange = () => { $("imagebox").hidden = mode() === "txt2img"; });
api("samplers").then((list) => { for (const s of list) $("sampler").add(new Option(s.name, s.name)); });
const imgc = $("imgc"), maskc = $("maskc");
$("initfile").onchange = () => { const f = $("initfile").files[0]; if (!f) return; const im = new Image();
  im.onload = () => { for (const c of [imgc, maskc]) { c.width = im.width; c.height = im.height; }
    $("canvases").style.width = im.width + "px"; $("canvases").style.height = im.height + "px";
    imgc.getContext("2d").drawImage(im, 0, 0); }; im.src = URL.createObjectURL(f); };
let painting = false;
const paint = (e) => { if (!painting) return; const r = maskc.getBoundingClientRect(), g = maskc.getContext("2d");
  g.fillStyle = "#fff"; g.beginPath(); g.arc(e.clientX - r.left, e.clientY - r.top, $("brush").value / 2, 0, 7); g.fill(); };
maskc.onpointerdown = (e) => { painting = true; paint(e); }; maskc.onpointermove = paint;
window.onpointerup = () => { painting = false; };
$("clearmask").onclick = () => maskc.getContext("2d").clearRect(0, 0, maskc.width, maskc.height);
const maskData = () => { const c = document.createElement("canvas"); c.width = maskc.width; c.height = maskc.height;
  const g = c.getContext("2d"); g.fillStyle = "#000"; g.fillRect(0, 0, c.width, c.height); g.drawImage(maskc, 0, 0);
  return c.toDataURL("image/png"); };
const num = (id) => Number($(id).value);
let polling = null;
const poll = () => api("progress").then((p) => { $("status").textContent = p.state.job ?
  `${p.state.job} ${p.state.job_no + 1}/${p.state.job_count}, step ${p.state.sampling_step}/${p.state.sampling_steps}` : "";
  if (p.current_image) $("preview").src = "data:image/png;base64," + p.current_image; }).catch(() => {});
$("go").onclick = async () => {
  $("err").textContent = ""; const kind = mode() === "txt2img" ? "txt2img" : "img2img";
  const body = {prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: num("steps"), cfg_scale: num("cfg"), width: num("width"), height: num("height"), seed: num("seed"),
    batch_size: num("batch"), n_iter: num("niter")};
  if (kind === "img2img") { if (!imgc.width) { $("err").textContent = "choose an image first"; return; }
    body.init_images = [imgc.toDataURL("image/png")]; body.denoising_strength = num("denoise");
    if (mode() === "inpaint") body.mask = maskData(); }
  $("go").disabled = true; polling = setInterval(poll, 500);
  try { const r = await api(kind, body); const info = JSON.parse(r.info);
    r.images.forEach((b, i) => { const im = new Image(); im.src = "data:image/png;base64," + b;
      im.title = info.infotexts[i] || ""; im.onclick = () => { $("info").textContent = im.title; };
      $("gallery").prepend(im); });
    $("info").textContent = info.infotexts[0] || "";
  } catch (e) { $("err").textContent = e.message; }
  finally { clearInterval(polling); $("go").disabled = false; $("status").textContent = ""; }
};
$("stop").onclick = () => api("interrupt", {});
$("skip").onclick = () => api("skip", {});
$("drop").ondragover = (e) => e.preventDefault();
$("drop").ondrop = (e) => { e.preventDefault(); const f = e.dataTransfer.files[0]; if (!f) return;
  const reader = new FileReader(); reader.onload = () => api("png-info", {image: reader.result})
    .then((r) => { $("pnginfo").textContent = r.info || "(no parameters)"; })
    .catch((x) => { $("pnginfo").textContent = x.message; }); reader.readAsDataURL(f); };
</script></body></html>
"""
