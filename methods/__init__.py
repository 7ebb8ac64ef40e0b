"""Pure torch / numpy / faiss anomaly-detection methods. Nothing in this package imports Ray."""

from reconray.methods.base import METHODS, AnomalyMethod, BankMethod, MethodState, create_method, register_method

# Importing the method modules fills the registry (timm-style: one decorated class per file).
from reconray.methods import patchcore as _patchcore  # noqa: F401,E402  isort: skip
from reconray.methods import sgfr as _sgfr  # noqa: F401,E402  isort: skip
from reconray.methods import rlr as _rlr  # noqa: F401,E402  isort: skip

__all__ = ["METHODS", "AnomalyMethod", "BankMethod", "MethodState", "create_method", "register_method"]
