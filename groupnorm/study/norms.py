"""The one norm registry of the study, and the batch-statistics norms it needs.

``NORMS`` is a plain dict ``name -> factory``. A factory is called as
``factory(num_channels, **opts)`` and returns an ``nn.Module``; ``opts`` always holds

* ``dims`` (1, 2 or 3): spatial dimensionality of the input,
* ``ghost_size`` (int or None): per-device batch for batch-statistics norms,
* ``num_groups`` / ``group_size``: the GN grouping (exactly one is not None),
* ``eps``, ``momentum``, and the batch-renorm knobs ``rmax``, ``dmax``,
  ``renorm_warmup_steps``.

A factory ignores the options it does not need, so a user norm can be as simple as
``lambda c, **_: MyNorm(c)``. Two optional attributes on a factory tell the models how
to build the convolutions around it: ``conv_ws`` (use Weight-Standardized convs) and
``conv_bias`` (give convs a bias, for ``none``).

Example::

    >>> from groupnorm.study.norms import NORMS, register_norm, make_norm
    >>> register_norm("rms", lambda c, **_: torch.nn.GroupNorm(1, c))
    >>> make_norm("rms", 64, dims=2)
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from groupnorm import GroupNorm
from groupnorm.ws import WSConv1d, WSConv2d, WSConv3d


def _group_norm(num_groups, num_channels, eps=1e-5, *, group_size=None):
    """This package's ``GroupNorm`` (the op the study is about)."""
    return GroupNorm(num_groups, num_channels, eps=eps, group_size=group_size)


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _split_ghosts(x: torch.Tensor, ghost_size: int) -> torch.Tensor:
    """View ``x`` of shape (N, C, *) as (K, g, C, M): K ghost batches of g samples."""
    n, c = x.shape[0], x.shape[1]
    if n % ghost_size != 0:
        raise ValueError(
            f"batch of {n} samples is not divisible by the per-device (ghost) batch "
            f"{ghost_size}; use a total batch that is a multiple of the per-device batch"
        )
    return x.reshape(n // ghost_size, ghost_size, c, -1)


class GhostBatchNorm(nn.Module):
    r"""Batch normalization with statistics per *ghost batch* (simulated device).

    In training mode a batch of N samples is split into K = N / ``ghost_size``
    consecutive micro-batches; each is normalized with its own mean and (biased)
    variance, exactly as K devices that each hold ``ghost_size`` samples would do
    with unsynchronized BN. The running statistics are updated with the average over
    the K micro-batches of their mean and unbiased variance, which equals averaging
    the K devices' running buffers (the update is linear). With ``ghost_size=None``
    (or ``>= N``) this is :class:`torch.nn.BatchNorm2d` in every respect.

    With one sample per ghost and a 1x1 spatial extent the variance is 0: instead of
    raising (as torch does), the output is ``beta`` and the unbiased variance used for
    the running average is taken as 0. With one sample and a spatial extent > 1 the
    statistics are per image, as in Instance Norm.

    Args:
        num_features (int): C from an input of shape (N, C, *).
        ghost_size (int, optional): samples per simulated device. Default: None.
        eps (float): added to the variance. Default: 1e-5.
        momentum (float): running-average momentum. Default: 0.1.
        affine (bool): learnable gamma and beta. Default: True.
    """

    def __init__(self, num_features: int, ghost_size: Optional[int] = None, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True):
        super().__init__()
        self.num_features, self.ghost_size, self.eps, self.momentum = num_features, ghost_size, eps, momentum
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_size={self.ghost_size}, eps={self.eps}, momentum={self.momentum}"

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)

    def ghost_stats(self, x: torch.Tensor, ghost_size: int):
        """Per-ghost (view, mean, biased var, count); mean/var have shape (K, C)."""
        xg = _split_ghosts(x, ghost_size)
        mean = xg.mean(dim=(1, 3))
        var = xg.var(dim=(1, 3), unbiased=False)
        return xg, mean, var, xg.shape[1] * xg.shape[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.ghost_size
        if self.training and getattr(self, "_sync", False) and _dist_on():
            return self._sync_forward(x)
        if not self.training or g is None or g >= x.shape[0]:
            if self.training and x.shape[0] * x[0, 0].numel() == 1:
                return self._single_value(x)
            if self.training:
                self.num_batches_tracked += 1  # F.batch_norm leaves the counter alone
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training, self.momentum, self.eps)
        xg, mean, var, count = self.ghost_stats(x, g)
        y = (xg - mean[:, None, :, None]) * torch.rsqrt(var[:, None, :, None] + self.eps)
        self._update_running(mean, var, count)
        return self._affine(y.reshape(x.shape))

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Running averages from per-ghost (ghosts, C) batch statistics of ``count`` values each."""
        # unbiased variance, averaged over ghosts (= mean of per-device running buffers)
        unbiased = var * (count / (count - 1)) if count > 1 else torch.zeros_like(var)
        self.running_mean.lerp_(mean.mean(0), self.momentum)
        self.running_var.lerp_(unbiased.mean(0), self.momentum)
        self.num_batches_tracked += 1

    def _sync_forward(self, x):
        # syncbn under torchrun: statistics over the samples of all processes. The sums are
        # all-reduced with autograd, so gradients flow to every process's samples (this
        # works with gloo on CPU, where torch.nn.SyncBatchNorm does not).
        import warnings

        from torch.distributed.nn.functional import all_reduce

        red = [0] + list(range(2, x.dim()))
        local = torch.cat([x.sum(red), (x * x).sum(red),
                           x.new_full((1,), float(x.numel() // x.shape[1]))])
        with warnings.catch_warnings():  # deprecation notice; the replacement has no autograd
            warnings.simplefilter("ignore", FutureWarning)
            tot = all_reduce(local)
        c = self.num_features
        count = tot[2 * c]
        mean = tot[:c] / count
        var = (tot[c:2 * c] / count - mean * mean).clamp_min(0)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        with torch.no_grad():
            n = float(count)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * (n / max(n - 1, 1.0)), self.momentum)
            self.num_batches_tracked += 1
        return self._affine(y)

    def _single_value(self, x):
        # torch raises "Expected more than 1 value per channel"; the normalized value of a
        # single number is 0, so the output is beta (documented, not an error).
        with torch.no_grad():
            self.running_mean.lerp_(x.reshape(-1).detach(), self.momentum)
            self.running_var.mul_(1 - self.momentum)
            self.num_batches_tracked += 1
        return self._affine(torch.zeros_like(x))


class BatchRenorm(GhostBatchNorm):
    r"""Batch Renormalization (Ioffe, 2017) with optional per-ghost statistics.

    In training, each (ghost) batch is normalized with its own statistics and then
    corrected towards the running statistics:

    .. math::
        y = \frac{x - \mu_B}{\sigma_B} r + d,\quad
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\left(\frac{\sigma_B}{\sigma}\right),\quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\left(\frac{\mu_B - \mu}{\sigma}\right)

    where r and d are treated as constants (no gradient) and :math:`\mu, \sigma` are
    the running mean and standard deviation. As in the paper, ``rmax`` ramps from 1
    and ``dmax`` from 0 linearly over ``warmup_steps`` training steps (0 = no ramp),
    so training starts as plain BN. Evaluation uses the running statistics.

    Args:
        num_features (int): C from an input of shape (N, C, *).
        ghost_size (int, optional): samples per simulated device. Default: None.
        rmax (float): final clip of r. Default: 3.
        dmax (float): final clip of d. Default: 5.
        warmup_steps (int): steps of the linear ramp of rmax/dmax. Default: 0.
        eps, momentum, affine: as :class:`GhostBatchNorm`.
    """

    def __init__(self, num_features, ghost_size=None, eps=1e-5, momentum=0.01, affine=True,
                 rmax: float = 3.0, dmax: float = 5.0, warmup_steps: int = 0):
        super().__init__(num_features, ghost_size, eps, momentum, affine)
        self.rmax, self.dmax, self.warmup_steps = rmax, dmax, warmup_steps

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"

    def current_limits(self):
        """The (rmax, dmax) in force at the current step of the ramp."""
        if self.warmup_steps <= 0:
            return self.rmax, self.dmax
        t = min(1.0, float(self.num_batches_tracked) / self.warmup_steps)
        return 1.0 + (self.rmax - 1.0) * t, self.dmax * t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        g = x.shape[0] if self.ghost_size is None else min(self.ghost_size, x.shape[0])
        xg, mean, var, count = self.ghost_stats(x, g)     # xg: (K, g, C, M); mean/var: (K, C)
        std = torch.sqrt(var + self.eps)
        rmax, dmax = self.current_limits()
        with torch.no_grad():
            run_std = torch.sqrt(self.running_var + self.eps)
            r = (std / run_std).clamp(1.0 / rmax, rmax)
            d = ((mean - self.running_mean) / run_std).clamp(-dmax, dmax)
        y = (xg - mean[:, None, :, None]) / std[:, None, :, None] * r[:, None, :, None] + d[:, None, :, None]
        self._update_running(mean, var, count)
        return self._affine(y.reshape(x.shape))


# --------------------------------------------------------------------------- factories
def _bn(c, *, ghost_size=None, eps=1e-5, momentum=0.1, **_):
    return GhostBatchNorm(c, ghost_size=ghost_size, eps=eps, momentum=momentum)


def _syncbn(c, *, eps=1e-5, momentum=0.1, **_):
    # Statistics over the whole batch of all devices: in one process that is the whole
    # (non-ghosted) batch; under torchrun the sums are all-reduced across processes.
    m = GhostBatchNorm(c, ghost_size=None, eps=eps, momentum=momentum)
    m._sync = True  # set_ghost_size leaves it alone; all-reduced under torchrun
    return m


def _batchrenorm(c, *, ghost_size=None, eps=1e-5, rmax=3.0, dmax=5.0, renorm_warmup_steps=0,
                 renorm_momentum=0.01, **_):
    return BatchRenorm(c, ghost_size=ghost_size, eps=eps, momentum=renorm_momentum, rmax=rmax,
                       dmax=dmax, warmup_steps=renorm_warmup_steps)


def _gn(c, *, num_groups=None, group_size=None, eps=1e-5, **_):
    if num_groups is None and group_size is None:
        num_groups = 32
    if num_groups is not None:
        # a layer narrower than G channels: use as many groups as channels (documented)
        g = min(num_groups, c)
        if c % g:
            raise ValueError(f"gn: num_channels={c} is not divisible by num_groups={g}; "
                             f"pick --gn-groups among the divisors of every layer width")
        return _group_norm(g, c, eps)
    gs = min(group_size, c)
    if c % gs:
        raise ValueError(f"gn: num_channels={c} is not divisible by group_size={gs}; "
                         f"pick --gn-group-size dividing every layer width")
    return _group_norm(None, c, eps, group_size=gs)


def _gn_ws(c, **opts):
    return _gn(c, **opts)


_gn_ws.conv_ws = True


def _ln(c, *, eps=1e-5, **_):
    return _group_norm(1, c, eps)


def _in(c, *, eps=1e-5, **_):
    return _group_norm(c, c, eps)


def _none(c, **_):
    return nn.Identity()


_none.conv_bias = True

NormFactory = Callable[..., nn.Module]

#: name -> factory(num_channels, **opts). Add your own with :func:`register_norm`.
NORMS: dict[str, NormFactory] = {
    "bn": _bn,
    "syncbn": _syncbn,
    "batchrenorm": _batchrenorm,
    "ln": _ln,
    "in": _in,
    "gn": _gn,
    "gn+ws": _gn_ws,
    "none": _none,
}

#: norms whose output depends on the other samples of the (per-device) batch
BATCH_NORMS = {"bn", "syncbn", "batchrenorm"}


def register_norm(name: str, factory: NormFactory, *, conv_ws: bool = False, conv_bias: bool = False,
                  overwrite: bool = False) -> NormFactory:
    """Add ``factory`` to :data:`NORMS` under ``name``.

    Args:
        name (str): the name used in ``--norms``.
        factory (callable): ``factory(num_channels, **opts) -> nn.Module``.
        conv_ws (bool): build the convolutions with Weight Standardization.
        conv_bias (bool): give the convolutions a bias (for norms that have no beta).
        overwrite (bool): replace an existing entry instead of raising.
    """
    if not callable(factory):
        raise TypeError(f"register_norm: factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in NORMS and not overwrite:
        raise ValueError(f"register_norm: {name!r} is already registered; pass overwrite=True to replace it")
    if conv_ws:
        factory.conv_ws = True
    if conv_bias:
        factory.conv_bias = True
    NORMS[name] = factory
    return factory


def resolve_norm(norm: Union[str, NormFactory]) -> NormFactory:
    """Return the factory for a registered name, or ``norm`` itself if it is callable."""
    if callable(norm):
        return norm
    try:
        return NORMS[norm]
    except KeyError:
        raise ValueError(f"unknown norm {norm!r}; registered: {sorted(NORMS)} "
                         "(or pass a callable / use register_norm)") from None


def norm_name(norm: Union[str, NormFactory]) -> str:
    """A printable name for a norm given by name or callable."""
    if isinstance(norm, str):
        return norm
    for k, v in NORMS.items():
        if v is norm:
            return k
    return getattr(norm, "__name__", repr(norm))


def make_norm(norm: Union[str, NormFactory], num_channels: int, **opts) -> nn.Module:
    """Build one norm layer for ``num_channels`` channels (see module docstring for opts)."""
    opts.setdefault("dims", 2)
    return resolve_norm(norm)(num_channels, **opts)


def set_ghost_size(model: nn.Module, ghost_size: Optional[int]) -> None:
    """Set the per-device batch of every ghost-capable BN layer in ``model``."""
    for m in model.modules():
        if isinstance(m, GhostBatchNorm) and not getattr(m, "_sync", False):
            m.ghost_size = ghost_size


def conv_class(factory: NormFactory, dims: int):
    """The convolution class to pair with ``factory`` for ``dims`` spatial dims."""
    if getattr(factory, "conv_ws", False):
        return {1: WSConv1d, 2: WSConv2d, 3: WSConv3d}[dims]
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


#: one line per registered norm, for ``groupnorm --list-norms``
DESCRIPTIONS = {
    "bn": "BatchNorm, statistics per device (ghost batch of --batch-sizes)",
    "syncbn": "BatchNorm over all devices of a step (all-reduced under torchrun)",
    "batchrenorm": "Batch Renormalization (Ioffe 2017), r/d clipped at --rmax/--dmax",
    "ln": "LayerNorm = GroupNorm with G=1 (groupnorm.GroupNorm)",
    "in": "InstanceNorm = GroupNorm with one channel per group (groupnorm.GroupNorm)",
    "gn": "GroupNorm (groupnorm.GroupNorm), --gn-groups or --gn-group-size",
    "gn+ws": "GroupNorm + Weight Standardized convolutions (groupnorm.ws)",
    "none": "no normalization (convolutions get a bias)",
}

__all__ = ["NORMS", "BATCH_NORMS", "DESCRIPTIONS", "GhostBatchNorm", "BatchRenorm", "register_norm",
           "resolve_norm", "make_norm", "norm_name", "set_ghost_size", "conv_class"]
