"""iddc: IDDC unsupervised semantic segmentation with an exact, fused pair loss."""
from .loss import IDDCConfig, IDDCLoss, IDDCOutput, PRESETS, iddc_loss

__all__ = ["IDDCConfig", "IDDCLoss", "IDDCOutput", "PRESETS", "iddc_loss"]
__version__ = "0.1.0"
