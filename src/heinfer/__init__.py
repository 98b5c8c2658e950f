"""heinfer: encrypted inference as a web service, on Microsoft SEAL.

Model owners `compile` a fitted scikit-learn linear model and serve it (`heinfer serve`); data
owners use `Client` to encrypt inputs, call the service and decrypt the scores. The service
never holds a secret key.
"""

from heinfer import errors
from heinfer.client import Client
from heinfer.errors import HeinferError
from heinfer.models import EncryptedModel, compile, load_model

__all__ = ["Client", "EncryptedModel", "HeinferError", "compile", "errors", "load_model"]
__version__ = "0.1.0"
