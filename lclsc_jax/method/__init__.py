"""The LCL-SC method as pure JAX functions (see docs/method.md for the equations)."""

from lclsc_jax.method.common import cosine_similarity, normalize
from lclsc_jax.method.contrastive import (
    label_contrastive_loss,
    prototype_contrastive_loss,
    supervised_contrastive_loss,
)
from lclsc_jax.method.global_embeddings import (
    class_means,
    ema_update,
    gei_logits,
    gei_predict,
    init_global_embeddings,
)
from lclsc_jax.method.losses import cross_entropy_loss
from lclsc_jax.method.saliency_consistency import (
    apply_transform,
    class_saliency_maps,
    decomposed_saliency_maps,
    equivariance_loss,
    prediction_consistency_loss,
    resolve_k,
    saliency_consistency_loss,
    sc_logits,
    tk_mmp,
)
from lclsc_jax.method.self_supervised import (
    cosine_schedule,
    dino_center_update,
    dino_loss,
    ema_params,
    nt_xent_loss,
    teacher_temperature,
)
from lclsc_jax.method.transforms import (
    NUM_DIHEDRAL,
    dihedral,
    dihedral_batch,
    dihedral_np,
    transform_axes,
)

__all__ = [
    "cosine_schedule",
    "dino_center_update",
    "dino_loss",
    "ema_params",
    "nt_xent_loss",
    "teacher_temperature",
    "NUM_DIHEDRAL",
    "apply_transform",
    "class_means",
    "class_saliency_maps",
    "cosine_similarity",
    "cross_entropy_loss",
    "decomposed_saliency_maps",
    "dihedral",
    "dihedral_batch",
    "dihedral_np",
    "ema_update",
    "equivariance_loss",
    "gei_logits",
    "gei_predict",
    "init_global_embeddings",
    "label_contrastive_loss",
    "normalize",
    "prediction_consistency_loss",
    "prototype_contrastive_loss",
    "resolve_k",
    "saliency_consistency_loss",
    "sc_logits",
    "supervised_contrastive_loss",
    "tk_mmp",
    "transform_axes",
]
