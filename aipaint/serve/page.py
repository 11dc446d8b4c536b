"""The web page at ``/``: txt2img, img2img, inpainting with a mask brush (eraser, invert,
clear, size) and outpainting, the sampler and schedule type, LoRA and embedding pickers,
progress with the live preview, interrupt and skip, a gallery that shows each image's
parameters, and PNG info by dropping a file.

One self-contained HTML document that calls the server's own ``/sdapi/v1`` API: no network
assets (scripts, fonts, styles) so it works offline; kept in a module so it installs with the
package. Blank width, height, steps, CFG and sampler are left out of the request, so the
server uses the loaded model's own defaults (img2img: the input image's size).

Outpainting is done the way A1111 clients do it through the API ("poor man's outpainting"):
the page extends the image on the chosen sides (the new area filled with the stretched edge
pixels), makes a mask that covers the new area (and ``2 x mask blur`` pixels of seam into the
old one), and sends that as an img2img inpainting request with ``inpainting_fill`` 1
(original: start from the stretched edges) or 2 (latent noise).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>aipaint</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
[hidden]{display:none!important}body{font-family:system-ui,sans-serif;margin:1em;max-width:1100px}
fieldset{border:1px solid #ccc;margin:.5em 0}label{display:inline-block;margin:.2em .6em .2em 0}
textarea{width:100%;height:4em}#gallery img{width:128px;margin:2px;cursor:pointer;image-rendering:pixelated;
border:3px solid transparent}#gallery img.sel{border-color:#36c}
#canvases{position:relative;display:inline-block;background:#eee}
#canvases canvas{position:absolute;left:0;top:0;image-rendering:pixelated}
#maskc{opacity:.55;cursor:crosshair;touch-action:none}#err{color:#b00}#preview{width:256px;image-rendering:pixelated}
#drop{border:2px dashed #aaa;padding:1em;margin:.5em 0}pre{white-space:pre-wrap}input[type=number]{width:6em}
</style></head><body>
<h1>aipaint</h1>
<fieldset><legend>Mode</legend>
<label><input type="radio" name="mode" value="txt2img" checked> txt2img</label>
<label><input type="radio" name="mode" value="img2img"> img2img</label>
<label><input type="radio" name="mode" value="inpaint"> inpaint</label>
<label><input type="radio" name="mode" value="outpaint"> outpaint</label></fieldset>
<textarea id="prompt" placeholder="prompt">a big red circle on the left, on a white background</textarea>
<textarea id="negative" placeholder="negative prompt"></textarea>
<fieldset><legend>LoRA and embeddings (inserted at the cursor)</legend>
<label>LoRA <select id="lora"></select></label>
<label>weight <input id="loraw" type="number" value="1" step="0.05"></label>
<button id="addlora">insert LoRA</button>
<label>embedding <select id="embedding"></select></label>
<button id="addemb">insert embedding</button>
<button id="refreshnets" title="read the LoRA and embedding folders again">refresh</button></fieldset>
<fieldset><legend>Parameters (blank: the model's default)</legend>
<label>sampler <select id="sampler"><option value="">(model default)</option></select></label>
<label>schedule type <select id="scheduler"></select></label>
<label>steps <input id="steps" type="number" min="1" max="1000" placeholder="model"></label>
<label>CFG <input id="cfg" type="number" step="0.5" min="1" max="30" placeholder="model"></label>
<label title="blank: the model's default size (img2img: the input image's size)">width
<input id="width" type="number" step="8" placeholder="model"></label>
<label title="blank: the model's default size (img2img: the input image's size)">height
<input id="height" type="number" step="8" placeholder="model"></label>
<label>seed <input id="seed" type="number" value="-1"></label>
<label>batch size <input id="batch" type="number" value="1" min="1" max="64"></label>
<label>batch count <input id="niter" type="number" value="1" min="1" max="100"></label>
<label>denoising <input id="denoise" type="number" value="0.75" step="0.05" min="0" max="1"></label>
</fieldset>
<fieldset id="imagebox" hidden><legend>Input image</legend>
<input type="file" id="initfile" accept="image/*">
<button id="useimg" disabled>use the selected gallery image</button>
<label id="blurbox">mask blur <input id="maskblur" type="number" value="4" min="0" max="64"></label>
<span id="masktools"><br>
<label>brush size <input id="brush" type="range" min="2" max="128" value="16"></label>
<label><input type="checkbox" id="eraser"> eraser</label>
<button id="invertmask">invert mask</button> <button id="clearmask">clear mask</button>
<label>masked content <select id="fill"><option value="0">fill</option><option value="1" selected>original</option>
<option value="2">latent noise</option><option value="3">latent nothing</option></select></label>
<label><input type="checkbox" id="fullres"> only masked area</label></span>
<span id="outtools" hidden><br>
<label><input type="checkbox" id="out-left"> left</label><label><input type="checkbox" id="out-right" checked> right</label>
<label><input type="checkbox" id="out-up"> up</label><label><input type="checkbox" id="out-down"> down</label>
<label>pixels <input id="outpx" type="number" value="64" min="8" step="8"></label>
<label>new area starts from <select id="outfill"><option value="2" selected>latent noise</option>
<option value="1">the stretched edge pixels</option></select></label></span><br>
<div id="canvases"><canvas id="imgc" width="0" height="0"></canvas><canvas id="maskc" width="0" height="0"></canvas></div>
</fieldset>
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
const showMode = () => { const m = mode(); $("imagebox").hidden = m === "txt2img";
  $("blurbox").hidden = m !== "inpaint" && m !== "outpaint"; $("masktools").hidden = $("maskc").hidden = m !== "inpaint";
  $("outtools").hidden = m !== "outpaint"; };
document.querySelectorAll("input[name=mode]").forEach((e) => e.onchange = showMode);
showMode();
const fillSelect = (select, items, keep) => { const was = select.value; while (select.length > keep) select.remove(keep);
  for (const [value, label] of items) select.add(new Option(label, value)); if ([...select.options].some((o) => o.value === was)) select.value = was; };
const shown = (e) => { $("err").textContent = e.message; };
api("samplers").then((list) => fillSelect($("sampler"), list.map((s) => [s.name, s.name]), 1)).catch(shown);
api("schedulers").then((list) => fillSelect($("scheduler"), list.map((s) => [s.name, s.label || s.name]), 0)).catch(shown);
const loadNets = () => {
  api("loras").then((list) => fillSelect($("lora"), list.map((l) => [l.name, l.alias || l.name]), 0)).catch(() => {});
  api("embeddings").then((e) => fillSelect($("embedding"), Object.keys(e.loaded || {}).map((n) => [n, n]), 0)).catch(() => {});
};
loadNets();
$("refreshnets").onclick = () => api("refresh-loras", {}).catch(shown).finally(loadNets);
// LoRA tags and embedding names go in at the cursor of the prompt (or negative prompt) last focused.
let target = $("prompt");
for (const t of [$("prompt"), $("negative")]) t.addEventListener("focus", () => { target = t; });
const insert = (text) => { const t = target, a = t.selectionStart, b = t.selectionEnd, v = t.value;
  const before = a > 0 && !/\\s/.test(v[a - 1]) ? " " : "", after = b < v.length && !/\\s/.test(v[b]) ? " " : "";
  t.setRangeText(before + text + after, a, b, "end"); t.focus(); };
$("addlora").onclick = () => { if (!$("lora").value) { $("err").textContent = "no LoRA to insert: the LoRA folder is empty"; return; }
  const w = $("loraw").value.trim() === "" ? "1" : $("loraw").value.trim(); insert(`<lora:${$("lora").value}:${w}>`); };
$("addemb").onclick = () => { if (!$("embedding").value) { $("err").textContent = "no embedding to insert: the embeddings folder is empty"; return; }
  insert($("embedding").value.split("/").pop()); };
// The input image and the mask drawn over it (alpha = repaint), shown enlarged when small.
const imgc = $("imgc"), maskc = $("maskc");
const show = (src) => new Promise((done, fail) => { const im = new Image();
  im.onload = () => { for (const c of [imgc, maskc]) { c.width = im.width; c.height = im.height; }
    const big = Math.max(im.width, im.height), zoom = big < 384 ? Math.floor(384 / big) : Math.min(1, 768 / big);
    for (const c of [imgc, maskc, $("canvases")]) { c.style.width = im.width * zoom + "px"; c.style.height = im.height * zoom + "px"; }
    imgc.getContext("2d").drawImage(im, 0, 0); done(); };
  im.onerror = () => fail(new Error("cannot read that image")); im.src = src; });
$("initfile").onchange = () => { const f = $("initfile").files[0]; if (f) show(URL.createObjectURL(f)).catch(shown); };
let last = null;
const at = (e) => { const r = maskc.getBoundingClientRect(), k = maskc.width / r.width;
  return {x: (e.clientX - r.left) * k, y: (e.clientY - r.top) * k, w: $("brush").value * k}; };
const pen = () => { const g = maskc.getContext("2d");
  g.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  g.strokeStyle = g.fillStyle = "#f0a"; g.lineCap = g.lineJoin = "round"; return g; };
maskc.onpointerdown = (e) => { if (!maskc.width) return; maskc.setPointerCapture(e.pointerId); last = at(e);
  const g = pen(); g.beginPath(); g.arc(last.x, last.y, last.w / 2, 0, 2 * Math.PI); g.fill(); };
maskc.onpointermove = (e) => { if (!last) return; const p = at(e), g = pen();
  g.lineWidth = p.w; g.beginPath(); g.moveTo(last.x, last.y); g.lineTo(p.x, p.y); g.stroke(); last = p; };
window.addEventListener("pointerup", () => { last = null; });
$("clearmask").onclick = () => maskc.getContext("2d").clearRect(0, 0, maskc.width, maskc.height);
$("invertmask").onclick = () => { if (!maskc.width) return; const g = maskc.getContext("2d");
  const d = g.getImageData(0, 0, maskc.width, maskc.height), p = d.data;
  for (let i = 0; i < p.length; i += 4) { p[i] = 255; p[i + 1] = 0; p[i + 2] = 170; p[i + 3] = 255 - p[i + 3]; }
  g.putImageData(d, 0, 0); };
const canvas = (w, h) => { const c = document.createElement("canvas"); c.width = w; c.height = h; return c; };
// The mask as A1111 takes it: white where the image is repainted, black elsewhere.
const maskData = () => { const c = canvas(maskc.width, maskc.height), g = c.getContext("2d");
  const d = maskc.getContext("2d").getImageData(0, 0, c.width, c.height), p = d.data;
  for (let i = 0; i < p.length; i += 4) { p[i] = p[i + 1] = p[i + 2] = p[i + 3]; p[i + 3] = 255; }
  g.putImageData(d, 0, 0); return c.toDataURL("image/png"); };
// Outpainting: the image extended on the chosen sides, the new area started from the stretched
// edge pixels, and a mask over the new area plus a seam of 2 x mask blur into the old image.
const outpaint = () => { const s = {l: $("out-left").checked, r: $("out-right").checked, t: $("out-up").checked, b: $("out-down").checked};
  const px = Number($("outpx").value), blur = Number($("maskblur").value) || 0;
  if (!(s.l || s.r || s.t || s.b)) throw new Error("outpaint: tick at least one side (left, right, up, down)");
  if (!Number.isInteger(px) || px < 1) throw new Error("outpaint: pixels must be a whole number of at least 1");
  const w = imgc.width, h = imgc.height, l = s.l ? px : 0, r = s.r ? px : 0, t = s.t ? px : 0, b = s.b ? px : 0;
  const W = w + l + r, H = h + t + b, c = canvas(W, H), g = c.getContext("2d");
  g.imageSmoothingEnabled = false;
  const strip = (sx, sy, sw, sh, dx, dy, dw, dh) => { if (dw > 0 && dh > 0) g.drawImage(imgc, sx, sy, sw, sh, dx, dy, dw, dh); };
  strip(0, 0, 1, h, 0, t, l, h); strip(w - 1, 0, 1, h, l + w, t, r, h);
  strip(0, 0, w, 1, l, 0, w, t); strip(0, h - 1, w, 1, l, t + h, w, b);
  strip(0, 0, 1, 1, 0, 0, l, t); strip(w - 1, 0, 1, 1, l + w, 0, r, t);
  strip(0, h - 1, 1, 1, 0, t + h, l, b); strip(w - 1, h - 1, 1, 1, l + w, t + h, r, b);
  g.drawImage(imgc, l, t);
  const m = canvas(W, H), mg = m.getContext("2d"), seam = 2 * blur;
  mg.fillStyle = "#fff"; mg.fillRect(0, 0, W, H); mg.fillStyle = "#000";
  const x0 = l + (l ? seam : 0), y0 = t + (t ? seam : 0), x1 = l + w - (r ? seam : 0), y1 = t + h - (b ? seam : 0);
  if (x1 > x0 && y1 > y0) mg.fillRect(x0, y0, x1 - x0, y1 - y0);
  return {image: c.toDataURL("image/png"), mask: m.toDataURL("image/png"), width: W, height: H}; };
const num = (id) => Number($(id).value);
const opt = (id) => $(id).value.trim() === "" ? undefined : Number($(id).value);
// The gallery: a click selects an image and shows its parameters (its infotext).
let selected = null;
const select = (im) => { if (selected) selected.classList.remove("sel"); selected = im; im.classList.add("sel");
  $("info").textContent = im.dataset.info; $("useimg").disabled = false; };
$("useimg").onclick = () => { if (selected) show(selected.src).catch(shown); };
let polling = null;
const poll = () => api("progress").then((p) => { $("status").textContent = p.state.job ?
  `${p.state.job} ${p.state.job_no + 1}/${p.state.job_count}, step ${p.state.sampling_step}/${p.state.sampling_steps}` : "";
  if (p.current_image) $("preview").src = "data:image/png;base64," + p.current_image; }).catch(() => {});
$("go").onclick = async () => {
  $("err").textContent = ""; const kind = mode() === "txt2img" ? "txt2img" : "img2img";
  const body = {prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value || undefined,
    scheduler: $("scheduler").value || undefined, steps: opt("steps"), cfg_scale: opt("cfg"), width: opt("width"),
    height: opt("height"), seed: num("seed"), batch_size: num("batch"), n_iter: num("niter")};
  try {
    if (kind === "img2img") { if (!imgc.width) throw new Error("choose an input image first (a file, or a gallery image)");
      body.init_images = [imgc.toDataURL("image/png")]; body.denoising_strength = num("denoise");
      if (mode() === "inpaint") { body.mask = maskData(); body.mask_blur = num("maskblur");
        body.inpainting_fill = num("fill"); body.inpaint_full_res = $("fullres").checked; }
      if (mode() === "outpaint") { const o = outpaint(); body.init_images = [o.image]; body.mask = o.mask;
        body.width = o.width; body.height = o.height; body.mask_blur = num("maskblur"); body.inpainting_fill = num("outfill");
        body.inpaint_full_res = false; body.resize_mode = 0; } }
  } catch (e) { $("err").textContent = e.message; return; }
  $("go").disabled = true; polling = setInterval(poll, 500);
  try { const r = await api(kind, body); const info = JSON.parse(r.info); let first = null;
    r.images.forEach((b, i) => { const im = new Image(); im.src = "data:image/png;base64," + b;
      im.dataset.info = info.infotexts[i] || ""; im.title = im.dataset.info; im.onclick = () => select(im);
      $("gallery").insertBefore(im, $("gallery").children[i] || null); first = first || im; });
    if (first) select(first); else $("info").textContent = "(no image: the job was interrupted)";
  } catch (e) { $("err").textContent = e.message; }
  finally { clearInterval(polling); $("go").disabled = false; $("status").textContent = ""; }
};
$("stop").onclick = () => api("interrupt", {}).catch(shown);
$("skip").onclick = () => api("skip", {}).catch(shown);
$("drop").ondragover = (e) => e.preventDefault();
$("drop").ondrop = (e) => { e.preventDefault(); const f = e.dataTransfer.files[0]; if (!f) return;
  const reader = new FileReader(); reader.onload = () => api("png-info", {image: reader.result})
    .then((r) => { $("pnginfo").textContent = r.info || "(no parameters)"; })
    .catch((x) => { $("pnginfo").textContent = x.message; }); reader.readAsDataURL(f); };
</script></body></html>
"""
