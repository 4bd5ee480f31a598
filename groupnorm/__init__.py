"""groupnorm: Group Normalization for PyTorch (Wu & He, ECCV 2018).

An exact, fused GroupNorm op (``group_norm``, ``GroupNorm``) with CPU and Triton routes,
and the batch-size study that shows the BatchNorm/GroupNorm trade-off (``groupnorm`` CLI).
"""

from .conversion import ConversionReport, choose_groups, convert, convert_to_batchnorm, convert_ws, fuse
from .functional import group_norm
from .modules import GroupNorm
from .ops.routes import available_routes, use_route
from .ws import WSConv1d, WSConv2d, WSConv3d

__version__ = "0.1.0"

__all__ = [
    "group_norm", "GroupNorm", "use_route", "available_routes",
    "convert", "convert_to_batchnorm", "convert_ws", "fuse", "choose_groups", "ConversionReport",
    "WSConv1d", "WSConv2d", "WSConv3d", "__version__",
]
