"""Cross-framework interop: torchvision-named PyTorch/safetensors weights <-> Flax variables.

``load_torch_weights`` / ``export_torch_weights`` convert, ``load_torch_model`` gives a runnable
``(model, variables)`` pair (a plain classifier for torchvision/timm files with only ``fc``),
``imagenet_normalize`` prepares their inputs, ``init_backbone_from`` starts training from imported
weights, ``verify`` checks numerical parity against the PyTorch
reference in :mod:`lclsc_jax.interop.torch_reference` (torch imported lazily).
"""

from lclsc_jax.interop.preprocess import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalize
from lclsc_jax.interop.verify import TensorDiff, VerifyReport, compare_outputs, tensor_diff, verify
from lclsc_jax.interop.weights import (
    LoadReport,
    UnsafeCheckpointError,
    WeightsMismatchError,
    export_torch_weights,
    init_backbone_from,
    load_torch_model,
    load_torch_weights,
    model_config_from_state_dict,
    read_state_dict,
    state_dict_to_variables,
    torch_key,
    variables_to_state_dict,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadReport",
    "TensorDiff",
    "UnsafeCheckpointError",
    "VerifyReport",
    "WeightsMismatchError",
    "compare_outputs",
    "export_torch_weights",
    "imagenet_normalize",
    "init_backbone_from",
    "load_torch_model",
    "load_torch_weights",
    "model_config_from_state_dict",
    "read_state_dict",
    "state_dict_to_variables",
    "tensor_diff",
    "torch_key",
    "variables_to_state_dict",
    "verify",
]
