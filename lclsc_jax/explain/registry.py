"""The saliency methods: one :class:`MethodSpec` per method, in ``METHODS`` order.

Adding a method = its function (in a module of this package) plus one entry in ``REGISTRY``.
This module imports no JAX (``lclsc explain --help`` lists the methods from it); the functions
are named ``"module.function"`` and resolved on first use.

Function contracts, by ``level`` (``ex`` an :class:`lclsc_jax.explain.core.Explainer`, ``x (B, *S, C)``):

- ``"gradient_cam"``: ``cam_weights(acts, grads) -> weights``, broadcastable to ``acts (B, *s, c)``;
  the map is ``sum_c weights * acts`` (:func:`lclsc_jax.explain.cam.gradient_cam_map`).
- ``"stage"``: ``fn(ex, x, targets, stage, **options) -> (B, *s)`` raw map at one stage.
- ``"last_stage"``: ``fn(ex, x, targets) -> (B, *s)`` raw map at the last stage (``sc``).
- ``"input"``: ``fn(ex, x, targets, **options) -> (B, *S)`` raw map at input resolution.

``prepare`` (optional): ``prepare(x, options) -> (static options, dynamic arrays)``, run on the host
before compiling (SLIC segments, a PRNG key, a baseline array).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Level = Literal["gradient_cam", "stage", "last_stage", "input"]
InputNorm = Literal["relu", "abs", "none"]


@dataclass(frozen=True)
class MethodSpec:
    """One saliency method: its name, function, where it looks, and how its map is documented."""

    name: str
    function: str  # "module.attr" in lclsc_jax.explain (see the module docstring for the contract)
    level: Level
    summary: str  # one line: --help and the docs table
    formula: str  # the raw map (docs table, Markdown)
    cost: str  # per batch (docs table)
    options: Mapping[str, Any] = field(default_factory=dict)  # accepted options and their defaults
    input_norm: InputNorm = "relu"  # normalisation of an input-level map (then min-max)
    needs_projection: bool = False  # needs the projection head and the global class embeddings
    prepare: str | None = None  # "module.attr": host-side preparation of the options
    reference: str = ""  # the library class it is parity-tested against, if any
    volumes: bool = True  # runs on volumes (B, D, H, W, C) -> maps (B, D, H, W) (trilinear upsampling, 3D windows)

    @property
    def uses_stage(self) -> bool:
        """True if ``stage=`` selects where the map is computed."""
        return self.level in ("gradient_cam", "stage")

    @property
    def is_cam(self) -> bool:
        """True for feature-resolution maps (CAM normalisation pipeline), False for input-level maps."""
        return self.level != "input"

    def resolve(self, ref: str | None = None) -> Callable[..., Any]:
        """The function named ``ref`` (default: ``self.function``), imported from this package."""
        module, attr = (ref or self.function).rsplit(".", 1)
        return getattr(importlib.import_module(f"lclsc_jax.explain.{module}"), attr)


def _gradient_cam(name: str, weights: str, summary: str, formula: str, reference: str) -> MethodSpec:
    """A gradient-weighted CAM: ``weights`` is its ``cam_weights(acts, grads)`` in :mod:`cam`."""
    return MethodSpec(name, f"cam.{weights}", "gradient_cam", summary, formula,
                      "1 fwd + 1 bwd of the tail", reference=f"pytorch_grad_cam.{reference}")


REGISTRY: tuple[MethodSpec, ...] = (
    MethodSpec("sc", "cam.sc_map", "last_stage", "LCL-SC saliency maps: cosine of each location's projection to the class embedding",
               "`cos(g(F_l), G_c)` per location of the last stage (`g` = projection head per location)",
               "1 forward", needs_projection=True, options={"maps": "cosine"}),
    _gradient_cam("gradcam", "gradcam_weights", "Grad-CAM: activations weighted by the spatial mean of their gradients",
                  "`sum_k mean_s(g_k) A_k`", "GradCAM"),
    _gradient_cam("hirescam", "hirescam_weights", "HiResCAM: activations times their gradients, element-wise",
                  "`sum_k g_k A_k`", "HiResCAM"),
    _gradient_cam("gradcam++", "gradcam_plus_plus_weights", "Grad-CAM++: second-order weighting of positive gradients",
                  "`sum_k w_k A_k`, `w_k = sum_s relu(g) a`, `a = g^2 / (2 g^2 + sum_s(A_k) g^3 + 1e-6)` (0 where g = 0)",
                  "GradCAMPlusPlus"),
    _gradient_cam("xgradcam", "xgradcam_weights", "XGrad-CAM: gradients weighted by normalised activations",
                  "`sum_k w_k A_k`, `w_k = sum_s g_k A_k / (sum_s A_k + 1e-7)`", "XGradCAM"),
    _gradient_cam("layercam", "layercam_weights", "LayerCAM: activations times their positive gradients, element-wise",
                  "`sum_k relu(g_k) A_k`", "LayerCAM"),
    _gradient_cam("gradcam_elementwise", "elementwise_weights",
                  "Grad-CAM element-wise: the positive part of each activation-gradient product",
                  "`sum_k relu(g_k A_k)`", "GradCAMElementWise"),
    MethodSpec("eigencam", "cam.eigen_cam_map", "stage", "Eigen-CAM: first principal component of the activations",
               "projection of the per-channel-centred `A` on its first right singular vector; **sign fixed** so the "
               "map correlates positively with the channel-mean activation", "1 forward + SVD",
               reference="pytorch_grad_cam.EigenCAM"),
    MethodSpec("scorecam", "cam.score_cam", "stage", "Score-CAM: channels weighted by the score of the image masked by them",
               "`sum_k softmax_k(S(x * M_k)) A_k`, `M_k` = channel k upsampled (align_corners, as "
               "`UpsamplingBilinear2d`) and min-max scaled", "`c` full forwards", {"chunk_size": 64},
               reference="pytorch_grad_cam.ScoreCAM"),
    MethodSpec("ablationcam", "cam.ablation_cam", "stage", "Ablation-CAM: channels weighted by the score drop when zeroed",
               "`sum_k (y - y_k)/y A_k`, `y_k` = score with channel k zeroed", "`c` tail forwards",
               {"chunk_size": 256}, reference="pytorch_grad_cam.AblationCAM"),
    MethodSpec("fullgrad", "fullgrad.fullgrad", "input", "FullGrad: input-gradient plus bias-gradient maps of every layer",
               "`sum_ch norm|x * dS/dx| + sum_layers up(sum_ch norm|b * dS/dy|)` over every BatchNorm (effective bias "
               "`beta - mu gamma / sqrt(var+eps)`) and biased conv; `norm` = per-channel min-max", "1 fwd + 1 bwd",
               input_norm="none", reference="pytorch_grad_cam.FullGrad"),
    MethodSpec("crm", "cam.crm", "stage", "CRM: output error increase when each feature location is zeroed",
               "`R(l) = sum_k (d_k - y_k(l))^2 - (d_k - y_k)^2`, `y(l)` outputs with location `l` zeroed (all "
               "channels), `d` one-hot target", "`n` tail forwards", {"chunk_size": 256, "crm_output": "probs"}),
    MethodSpec("occlusion", "perturbation.occlusion", "input", "Occlusion: score drop when sliding windows are filled",
               "per pixel: mean score drop over the sliding windows covering it (window filled with `fill`)",
               "#windows forwards", {"patch_size": None, "stride": None, "fill": 0.0, "chunk_size": 64}),
    MethodSpec("superpixel", "perturbation.superpixel", "input", "Superpixels: score drop when each SLIC segment is filled",
               "per pixel: score drop when its SLIC superpixel is replaced by `fill`", "#segments forwards",
               {"segments": None, "n_segments": 50, "compactness": 10.0, "slic_sigma": 1.0, "fill": 0.0,
                "chunk_size": 64}, prepare="perturbation.prepare_superpixel"),
    MethodSpec("gradient", "gradients.gradient", "input", "Vanilla gradient of the score with respect to the input",
               "`max_ch |dS/dx|` (Simonyan et al. 2014); `channels='sum'`: `sum_ch dS/dx`", "1 fwd + bwd",
               {"channels": "max_abs"}, input_norm="abs"),
    MethodSpec("smoothgrad", "gradients.smoothgrad", "input", "SmoothGrad: input gradients averaged over noisy copies",
               "`sum_ch mean_j dS/dx(x + e_j)`, `e_j ~ N(0, (noise_level (max x - min x))^2)`",
               "`num_samples` fwd+bwd", {"num_samples": 16, "noise_level": 0.15, "rng": None, "chunk_size": 64},
               input_norm="abs", prepare="gradients.prepare_smoothgrad"),
    MethodSpec("integrated_gradients", "gradients.integrated_gradients", "input",
               "Integrated Gradients: input times the mean gradient on the path from a baseline",
               "`sum_ch (x - x0) mean_k dS/dx(x0 + a_k (x - x0))`, `a_k = (k + 1/2)/steps`", "`steps` fwd+bwd",
               {"steps": 32, "baseline": 0.0, "chunk_size": 64}, input_norm="abs",
               prepare="gradients.prepare_integrated_gradients"),
    MethodSpec("perturbation_generator", "generator.perturbation_generator", "input",
               "Optimal perturbation generator: a trained U-Net's mask in one forward pass (targets do not enter)",
               "`m = sigmoid(UNet(x))`, the U-Net trained to maximise the prediction drop of `x (1 - m) + m b` "
               "minus `area_weight mean(m)` (Rajapaksa & Khalvati 2022); averaged per SLIC segment if `n_segments`",
               "1 generator forward", {"generator": None, "generator_variables": None, "segments": None,
                                       "n_segments": 0, "compactness": 10.0, "slic_sigma": 1.0},
               input_norm="none", prepare="generator.prepare_generator"),
)

SPECS: dict[str, MethodSpec] = {s.name: s for s in REGISTRY}
METHODS: tuple[str, ...] = tuple(SPECS)
GRADIENT_CAMS: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.level == "gradient_cam")
STAGE_METHODS: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.uses_stage)
INPUT_METHODS: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.level == "input")
#: Methods that run on volumes ``(B, D, H, W, C)`` (every one at present; ``saliency`` refuses the others on 5D input).
VOLUME_METHODS: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.volumes)


def check_volumes(spec: MethodSpec, spatial_ndim: int) -> None:
    """``ValueError`` naming the method if it cannot explain inputs with ``spatial_ndim`` (3 = volumes) spatial axes."""
    if spatial_ndim == 3 and not spec.volumes:
        raise ValueError(f"saliency method {spec.name!r} does not run on volumes (B, D, H, W, C); "
                         f"methods that do: {VOLUME_METHODS}")
    if spatial_ndim not in (2, 3):
        raise ValueError(f"saliency maps need images (B, H, W, C) or volumes (B, D, H, W, C), got {spatial_ndim} "
                         "spatial axes")


def get(method: str) -> MethodSpec:
    """The spec of ``method``; ``ValueError`` naming the close match and every method otherwise."""
    if method in SPECS:
        return SPECS[method]
    squashed = method.replace("_", "").replace("-", "")
    close = [m for m in METHODS if m.replace("_", "").replace("+", "") in squashed or method.replace("-", "_") == m]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown saliency method {method!r}{hint}; expected one of {METHODS}")


def methods_help() -> str:
    """``lclsc explain --help``'s list: one ``name  summary`` line per method, in ``METHODS`` order."""
    width = max(len(m) for m in METHODS)
    return "\n".join(f"  {s.name:<{width}}  {s.summary}" + ("" if s.volumes else " [2D only]") for s in REGISTRY)


def _options_cell(options: Mapping[str, Any]) -> str:
    """``k=v`` list of a method's options for the docs table (``-`` if none)."""
    return ", ".join(f"`{k}={v!r}`" for k, v in options.items()) or "-"


def methods_table() -> str:
    """The Markdown methods table of docs/explain.md (between its ``methods-table`` markers)."""
    rows = ["| method | `stage` | what it shows | raw map | cost per batch | options (defaults) |",
            "|---|---|---|---|---|---|"]
    for s in REGISTRY:
        where = "any" if s.uses_stage else ("last" if s.level == "last_stage" else "input")
        rows.append(f"| `{s.name}` | {where} | {s.summary} | {s.formula.replace('|', chr(92) + '|')} | {s.cost} | "
                    f"{_options_cell(s.options)} |")
    return "\n".join(rows)
