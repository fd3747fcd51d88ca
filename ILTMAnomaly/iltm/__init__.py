"""ILTMAnomaly core: Iterative Latent Token Masking for anomaly detection trained on contaminated scans."""

__version__ = "0.1.0"

from .errors import InputError  # noqa: E402

__all__ = ["InputError", "__version__"]
