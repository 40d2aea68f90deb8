"""Model families, all reachable through one registry: ``create_model(name, num_classes)``.

Importing this package imports every family module, which registers its models.
"""

from cnntrain.models import fastnet, nnabla_resnet, resnet_cifar, singa, small, timm_models, zoo  # noqa: F401  (registers)
from cnntrain.models.registry import count_parameters, create_model, get_spec, list_models, register

__all__ = ["count_parameters", "create_model", "get_spec", "list_models", "register"]
