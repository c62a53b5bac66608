"""The kernel families of DREG and their fallback, as one state object of the process.

Every elementwise function of :mod:`hf_dreg.ops.formulas` (and a whole site of
:mod:`hf_dreg.ops.functions`) runs through :meth:`KernelCache.kernel`: compiled once per (function,
activation) with ``torch.compile`` when the caller asks for fused kernels, else eager. Where the machine
cannot compile (no C++ compiler, no triton, no dynamo on this Python) the process falls back to the same
math in eager mode, saying so once; a whole site this torch cannot trace as one region takes its parts
instead (the same values, more host time per step on a GPU). What was compiled, whether compilation
failed, and which whole-site regions could not be traced are the attributes of :data:`KERNELS`, the one
instance (tests and benchmarks read and reset it there).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

KERNEL_FAMILIES = ("auto", "triton", "compiled", "eager")


def resolve_kernels(kernels: str, device: torch.device | str | None) -> str:
    """The kernel family a model on ``device`` runs: ``kernels`` itself, or what ``"auto"`` means there.

    ``"auto"``: ``"triton"`` on a CUDA device (one kernel per site and direction, called directly: the
    host-bound GPU step is what DREG costs there), ``"compiled"`` elsewhere (torch.compile's fused CPU
    kernels, compiled once per machine; ``"eager"`` where the machine cannot compile).
    """
    if kernels not in KERNEL_FAMILIES:
        raise ValueError(
            f"Unknown DREG kernel family {kernels!r}: use one of {', '.join(KERNEL_FAMILIES)} "
            "(--dreg_kernels; DREGConfig(dreg_kernels=...); hf_dreg.attach(model, kernels=...))."
        )
    if kernels != "auto":
        if kernels == "triton" and importlib.util.find_spec("triton") is None:
            raise ImportError("dreg_kernels='triton' needs the triton package (pip install triton); it comes with CUDA builds of torch.")
        return kernels
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "compiled"


def _no_compiler_errors() -> tuple[type, ...]:
    """What torch.compile raises when this machine has no working compiler or backend for it."""
    from torch._inductor import exc

    return (exc.InvalidCxxCompiler, exc.CppCompileError, exc.TritonMissing, exc.GPUTooOldForTriton)


def missing_compiler(error: BaseException) -> BaseException | None:
    """The "no compiler / no backend" error behind ``error``, if that is what it is.

    Inductor raises those directly or wrapped (``BackendCompilerFailed``/``InductorError`` keep the
    original as ``inner_exception``; ``raise ... from`` keeps it as ``__cause__``). Anything else, a
    genuine bug included, gives None.
    """
    kinds = _no_compiler_errors()
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds):
            return error
        error = getattr(error, "inner_exception", None) or error.__cause__
    return None


@dataclass
class KernelCache:
    """The compiled kernels of this process and the fallback state.

    ``compiled``: (function, activation spec) -> its compiled kernel. ``failed``: the machine cannot
    compile, every kernel runs eager. ``untraceable``: whole-site functions this torch could not compile
    as one region (their sites take the parts route).
    """

    compiled: dict = field(default_factory=dict)
    failed: bool = False
    untraceable: set = field(default_factory=set)
    announced: bool = False  # the first compilation of the process was said (it can take a minute)

    def disable(self, reason: str) -> None:
        """Turn fusion off for the process (the compiler is missing for every kernel), saying so once."""
        if not self.failed:
            logger.warning(f"hf_dreg: fused DREG kernels unavailable ({reason}); using eager math.")
        self.failed = True

    def _bound(self, fn, spec):
        """``fn`` with ``spec`` bound, as a function with a code object of its own.

        Dynamo keeps its compiled graphs (and counts recompilations against ``recompile_limit``) per code
        object: one shared wrapper would pool every kernel and activation into one budget of 8.
        """

        def kernel(*args):
            return fn(spec, *args)

        kernel.__code__ = kernel.__code__.replace(co_name=f"dreg_{fn.__name__}_{len(self.compiled)}")
        return kernel

    def kernel(self, fn, spec, fused: bool, parts=None):
        """``fn`` bound to ``spec``, compiled into one fused kernel when ``fused``.

        Falls back to the same math in eager mode only where the machine cannot compile; any other error
        of the compiled kernel propagates, except for a whole site (``parts`` given: the same values by a
        simpler route). Tracing autograd Functions into one region needs a recent dynamo (torch 2.11's fails
        with an internal AssertionError on a plain site whose row statistics come from a parameter, the usual
        case; torch 2.13 traces it), so where it fails the site takes that route, saying so once per kind of site.
        """
        if not fused or self.failed or torch.compiler.is_compiling():
            # inside the model's own torch.compile graph the same math is traced into that graph (fused there)
            return lambda *args: fn(spec, *args)
        key = (fn, spec)
        if key not in self.compiled:
            from torch._dynamo import is_dynamo_supported

            if not is_dynamo_supported():
                self.disable("torch.compile is not supported on this platform")
                return lambda *args: fn(spec, *args)
            # A compiled region's backward is compiled lazily, during the first backward, and with donated buffers
            # it refuses retain_graph=True, which the gradient-ratio measurement and 'auto' need. The setting is
            # global (read when that backward compiles): it costs other compiled backwards the reuse of their
            # saved buffers.
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
            self.compiled[key] = torch.compile(self._bound(fn, spec), dynamic=True, fullgraph=True)
        compiled = self.compiled[key]

        def run(*args):
            if self.failed:
                return fn(spec, *args)
            if parts is not None and fn in self.untraceable:
                return parts(*args)
            if not self.announced:
                self.announced = True
                logger.warning(
                    "hf_dreg: compiling the fused DREG kernels with torch.compile: the first training step takes longer "
                    "(up to about a minute on a CPU with empty compiler caches), later ones do not. "
                    "dreg_kernels='eager' (--dreg_kernels eager) skips it and runs the same math eagerly; on a GPU, 'auto' uses Triton kernels instead."
                )
            try:
                return compiled(*args)
            except Exception as error:
                cause = missing_compiler(error)
                if cause is None and parts is not None:
                    self.untraceable.add(fn)
                    first_line = (str(error).strip().splitlines() or [""])[0]
                    logger.warning(
                        f"hf_dreg: torch {torch.__version__} cannot compile a whole DREG site as one region "
                        f"({fn.__name__}; {type(error).__name__}: {first_line[:200]}); using a simpler route: "
                        "the same values, more host time per step on a GPU."
                    )
                    return parts(*args)
                if cause is None:
                    raise
                first_line = (str(cause).strip().splitlines() or [""])[0]
                self.disable(f"{type(cause).__name__}: {first_line}")
                return fn(spec, *args)

        return run


KERNELS = KernelCache()


def kernel(fn, spec, fused: bool, parts=None):
    """:meth:`KernelCache.kernel` of the process' :data:`KERNELS`."""
    return KERNELS.kernel(fn, spec, fused, parts)
