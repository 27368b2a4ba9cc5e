"""Lightning pieces: QATModule, TextDataModule, callbacks. The core (qat.*) does not import this package."""
from qat.lit.callbacks import QuantStats, TextProgress, quantizer_stats
from qat.lit.data import TextDataModule
from qat.lit.module import QATModule, kd_loss

__all__ = ["QATModule", "TextDataModule", "QuantStats", "TextProgress", "quantizer_stats", "kd_loss"]
