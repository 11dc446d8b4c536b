"""int8 activations for the OpenVINO UNet: calibration on real generations, then NNCF's post-training quantisation.

Weight compression (``--weights int8``) makes the files smaller but leaves the arithmetic
in the compute precision: the weights are expanded back before each product, so on the
CPU it is rarely faster (0.90x fp32 per image on our AVX2 machines). Quantising the
**activations** too lets the CPU multiply in int8. Diffusion UNets lose quality when every
product is quantised, so only the **convolutions** get int8 weights and int8 activations
(NNCF's post-training quantisation, ``model_type=TRANSFORMER``); the matrix products
(attention projections, feed-forward layers, the time embedding) keep float activations:

* ``activations="int8"`` alone (:func:`conv_quantize`): the matrix products keep fp32
  weights too. The fastest on CPUs where weight decompression costs (ours: 66.9 s per 256 px
  full-size image against 69.1 s for the hybrid recipe and 87.4 s for optimum-intel's default,
  ``benchmarks/results/cpu_runtimes_int8a_image*.txt``);
* with ``weights="int8"`` (:func:`hybrid_quantize`): optimum-intel's hybrid recipe for
  Stable Diffusion (``quant_method="hybrid"``), the matrix products' weights compressed to
  int8 as well: smaller files.

The first and the last convolution (``conv_in``, ``conv_out``), which read and write the
latents themselves, stay float in both. Quantising them too cost 6.4 adherence points on
the embedded model (87.1 against 93.6 in fp32, 60 captions); keeping them float, 0.1–0.9
(``benchmarks/results/cpu_runtimes_int8a_embedded.txt``). They are a few percent of the
UNet's work.

Activation ranges come from calibration: the IR (its UNet still fp32) is loaded into the model it was
exported from, a few prompts are generated with it, and every UNet call's inputs are kept
(one calibration sample per step, the classifier-free-guidance batch included). The
calibration prompts should look like the prompts the model will be used with; the default
set is a handful of ordinary ones (:data:`DEFAULT_PROMPTS`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aipaint.errors import InvalidParameter

Log = Callable[[str], None]

DEFAULT_PROMPTS = (
    "a lighthouse on a cliff at sunset, oil painting",
    "portrait of an old fisherman, detailed face, soft light",
    "a bowl of fruit on a wooden table, still life",
    "a futuristic city street at night, neon lights, rain",
    "a watercolor painting of a fox in a snowy forest",
    "a red sports car on a mountain road, photograph",
    "an isometric drawing of a small cozy house with a garden",
    "a cat sleeping on a windowsill, cinematic lighting",
)


@dataclass(frozen=True)
class Calibration:
    """How the UNet's activation ranges are measured.

    ``model`` is the model the ONNX export was made from: a source for :func:`aipaint.load`
    (zoo id, folder, file) or an already loaded model or pipeline (it is copied, not
    changed). Each prompt is generated once, ``steps`` steps at ``width`` × ``height`` (the
    model's default size when ``None``) with ``cfg_scale``; every step is one sample.
    """

    model: Any
    prompts: Sequence[str] = DEFAULT_PROMPTS
    steps: int = 20
    width: int | None = None
    height: int | None = None
    cfg_scale: float = 7.0
    seed: int = 0
    load_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is None:
            raise InvalidParameter("calibration model", None, "the model the ONNX export was made from (a zoo id, "
                                   "folder or file)", "int8 activations are calibrated by generating with it")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise InvalidParameter("calibration prompts", list(self.prompts), "one or more non-empty prompts")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 150:
            raise InvalidParameter("calibration steps", self.steps, "a whole number from 1 to 150")


class RecordingSession:
    """A session that keeps a copy of every feed (as numpy arrays) and answers with the wrapped session."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.feeds: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def __call__(self, **inputs: Any) -> Any:
        self.feeds.append({name: value.detach().cpu().numpy().copy() for name, value in inputs.items()})
        return self.session(**inputs)


def collect_unet_inputs(calibration: Calibration, ir_dir: Path, log: Log | None = None) -> list[dict[str, Any]]:
    """Generate ``calibration.prompts`` with the IR in ``ir_dir`` (its UNet in fp32) and return every UNet call's inputs.

    Loading checks that the IR was made from ``calibration.model`` (the runtime's usual
    checks), so calibrating with another model is refused.
    """
    from aipaint_plugins.openvino_runtime.runtime import prepare_openvino

    from aipaint.pipeline import Pipeline

    log = log or (lambda message: None)
    options = {"openvino_dir": str(ir_dir), "verify": "size"}
    source = calibration.model
    if isinstance(source, (str, Path)):
        import aipaint

        pipe = aipaint.load(source, runtime="openvino", runtime_options=options, **calibration.load_options)
    else:
        model = copy.deepcopy(getattr(source, "model", source))
        prepare_openvino(model, options)
        pipe = Pipeline(model)
    recorder = RecordingSession(pipe.model.unet.session)
    pipe.model.unet.session = recorder
    size = {k: v for k, v in (("width", calibration.width), ("height", calibration.height)) if v}
    started = time.perf_counter()
    for index, prompt in enumerate(calibration.prompts):
        pipe.txt2img(prompt, steps=calibration.steps, cfg_scale=calibration.cfg_scale, seed=calibration.seed + index,
                     **size)
        log(f"  calibration {index + 1}/{len(calibration.prompts)}: {len(recorder.feeds)} UNet calls recorded "
            f"({time.perf_counter() - started:.0f} s)")
    return recorder.feeds


def weighted_products(graph: Any) -> list[str]:
    """Names of the MatMul and Gather operations that read a constant (weights), as optimum-intel's
    hybrid quantisation collects them: these keep float activations."""
    names = []
    for op in graph.get_ops():
        kind = op.get_type_name()
        if kind == "MatMul":
            inputs = (op.input_value(0).get_node(), op.input_value(1).get_node())
            if any(node.get_type_name() == "Constant" for node in inputs):
                names.append(op.get_friendly_name())
        elif kind == "Gather" and op.input_value(0).get_node().get_type_name() == "Constant":
            names.append(op.get_friendly_name())
    return names


def edge_convolutions(graph: Any) -> list[str]:
    """The first and the last convolution in the graph's order (a UNet's ``conv_in`` and ``conv_out``:
    every other convolution depends on the first, and the output on the last)."""
    convolutions = [op.get_friendly_name() for op in graph.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return sorted({convolutions[0], convolutions[-1]}) if convolutions else []


def conv_quantize(graph: Any, feeds: Sequence[dict[str, Any]]) -> Any:
    """The UNet ``graph`` (fp32 IR) with int8 weights and activations in its convolutions (but the first and
    the last), everything else as it was (see the module's docstring)."""
    return _quantize(graph, feeds, weighted_products(graph) + edge_convolutions(graph))


def hybrid_quantize(graph: Any, feeds: Sequence[dict[str, Any]]) -> Any:
    """The UNet ``graph`` (fp32 IR) with int8 weights everywhere and int8 activations in its convolutions
    (but the first and the last, see the module's docstring)."""
    import nncf

    ignored = weighted_products(graph) + edge_convolutions(graph)
    convolutions = any(op.get_type_name() == "Convolution" for op in graph.get_ops())
    compressed = nncf.compress_weights(graph, ignored_scope=nncf.IgnoredScope(types=["Convolution"]) if convolutions
                                       else None)
    return _quantize(compressed, feeds, ignored)


def _quantize(graph: Any, feeds: Sequence[dict[str, Any]], ignored: list[str]) -> Any:
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    if not feeds:
        raise InvalidParameter("calibration", 0, "at least one recorded UNet call")
    return nncf.quantize(
        graph,
        nncf.Dataset(list(feeds)),
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        subset_size=len(feeds),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)),
    )


def read_prompts(path: Path | str) -> list[str]:
    """Calibration prompts from a text file, one per line (blank lines and ``#`` comments skipped)."""
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidParameter("calibration prompts", str(path), "a text file with one prompt per line")
    return prompts
