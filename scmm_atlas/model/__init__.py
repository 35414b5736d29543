"""scMM's model maths in plain PyTorch: no Ray, MLflow or store imports; testable with a dict of tensors."""

from .mmvae import MMVAE, MMVAEConfig, MMVAEOutput, ModalitySpec
from .objectives import OBJECTIVES, Objective, moe_dreg, moe_elbo, moe_iwae

__all__ = ["MMVAE", "OBJECTIVES", "MMVAEConfig", "MMVAEOutput", "ModalitySpec", "Objective", "moe_dreg",
           "moe_elbo", "moe_iwae"]
