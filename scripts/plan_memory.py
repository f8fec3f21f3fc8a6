"""Memory plan of a training config, without allocating it: what one GPU holds under DDP and
under FSDP, whether it fits, and what to change if not.

    python scripts/plan_memory.py --config configs/diffusion/unet860m_shards.yaml --gpus 8 --gpu_memory 80
    python scripts/plan_memory.py --config configs/prior/maskgit1b_shards.yaml --model.init_args.autoencoder X.ckpt

Every option after the planner's own (``--gpus``, ``--gpu_memory``, ``--batch_size``,
``--precision``) is a ``train.py fit`` option: the same ``--config`` files and overrides.

The model is built on the meta device (shapes, no memory) and one training step of its own
``training_step`` (forward, backward, every optimizer step; a GAN's or VQGAN's manual steps
included) is traced by ``networks.memory.LiveBytes`` at the configured batch size, with and
without activation checkpointing. Attention is traced through a fused kernel, as a GPU runs it.
From the trace:

- parameters: trainable (in an optimizer), frozen, and the EMA copies; buffers;
- gradients and optimizer state (what the configured optimizer allocates at its first step);
- the step's peak above the weights: activations kept for the backward pass, gradients and
  temporaries, traced in fp32 (autocast has no meta kernels); at ``bf16-mixed`` the activations
  count half (a lower estimate: autocast keeps norms and softmax in fp32), at ``bf16-true`` the
  weights, gradients and optimizer state too;
- per GPU under DDP (gradient buckets: one more copy of the gradients) and under FSDP over N GPUs
  (trainable weights, gradients, optimizer state and EMA sharded N ways; frozen parts whole; the
  largest block gathered twice, the one running and the one prefetched).

The totals leave out the CUDA context and the allocator's caching and fragmentation: the fit test
keeps ``--headroom`` (default 10%) of the GPU free for them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.optim.optimizer as optimizer_module
from torch import nn

GIB = 2**30
LONG_CAPTION = " ".join(["a large dark red striped triangle to the left of a small pale blue circle"] * 8)


class PlanError(ValueError):
    pass


@dataclass
class StepTrace:
    """Bytes of one traced training step."""

    peak: int  # the most alive at once above the weights and optimizer state: activations, gradients, temporaries
    activations: int  # kept from the forward pass for the backward (at the end of the forward)
    gradients: int
    optimizer_state: int


@dataclass
class Plan:
    config: str
    precision: str
    batch_size: int
    image_size: int
    trainable: int  # parameters (counts)
    frozen: int
    ema: int
    weight_bytes: int  # parameters (all) and buffers, as held
    trainable_bytes: int
    ema_bytes: int
    frozen_bytes: int
    largest_block: tuple[str, int]  # (name, bytes): what FSDP gathers at once
    traces: dict[bool, StepTrace] = field(default_factory=dict)  # by checkpointing on/off

    # ------------------------------------------------------------------ per GPU
    def ddp(self, checkpointing: bool) -> int:
        t = self.traces[checkpointing]
        return self.weight_bytes + t.optimizer_state + t.peak + t.gradients  # + the gradient buckets

    def fsdp(self, gpus: int, checkpointing: bool) -> int:
        t = self.traces[checkpointing]
        sharded = (self.trainable_bytes + self.ema_bytes + t.optimizer_state + t.gradients) / gpus
        whole = self.weight_bytes - self.trainable_bytes - self.ema_bytes  # frozen parts and buffers
        block = self.largest_block[1]  # gathered while it runs, the next one prefetched, its gradient unsharded
        return int(sharded + whole + 3 * block + t.peak - t.gradients)



# ---------------------------------------------------------------------------- building
def _parser():
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--seed_everything", type=bool | int | None, default=True)
    parser.add_argument("--run_name", type=str | None, default=None)
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    return parser


@contextmanager
def _fused_optimizers_on_meta():
    """A ``fused=True`` optimizer (the GPU configs') built and stepped on meta tensors."""
    original = optimizer_module._get_fused_kernels_supported_devices
    optimizer_module._get_fused_kernels_supported_devices = lambda: [*original(), "meta"]
    try:
        yield
    finally:
        optimizer_module._get_fused_kernels_supported_devices = original


@contextmanager
def _untrained_autoencoder(config: str | None):
    """With ``config``: a prior's or latent diffusion's autoencoder checkpoint is stood in for by
    the autoencoder that config trains, untrained (the same shapes; no file needed)."""
    if config is None:
        yield
        return
    import lightning_modules.autoencoder as autoencoders

    original = autoencoders.load_autoencoder

    def from_config(path, map_location="cpu", option=None):
        model, _, _ = build(["--config", config, "--model.init_args.perceptual_weight", "0",
                             "--model.init_args.perceptual_path", "null"])  # fmt: skip
        return model.requires_grad_(False).eval()

    autoencoders.load_autoencoder = from_config
    try:
        yield
    finally:
        autoencoders.load_autoencoder = original


def build(args: list[str], device: str = "meta"):
    """``(model, datamodule, trainer config)`` of ``train.py fit`` options, the model on ``device``."""
    parser = _parser()
    try:
        cfg = parser.parse_args(args)
    except Exception as err:  # noqa: BLE001 - jsonargparse's own message names the option
        raise PlanError(f"the config does not parse: {err}") from err
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    with torch.device(device), _fused_optimizers_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the modules' own construction notes: the plan is what is said
        try:
            init = instantiate(cfg)
        except Exception as err:  # noqa: BLE001 - a missing checkpoint or weights folder, said by the module
            cause = err
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__
            hint = ("; to plan a prior or latent diffusion before its autoencoder is trained, give "
                    "--autoencoder_config with the autoencoder's config") if "autoencoder checkpoint" in str(cause) else ""  # fmt: skip
            raise PlanError(f"the model or data cannot be built: {cause}{hint}") from err
    return init.model, init.data, cfg.trainer


# ---------------------------------------------------------------------------- tracing
class _Stepper:
    """An optimizer as a LightningModule's manual step sees it (``.optimizer``, ``step``, ``zero_grad``)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class _TraceFabric:
    """What a LightningModule's training step asks of its trainer, outside one: backward, its
    optimizers, logging (dropped), step 0 on one process. Anything else is named in the error."""

    def __init__(self, optimizers):
        self.optimizers, self.lr_scheduler_configs = optimizers, []
        self.logger, self.loggers = None, []
        self.global_step = self.current_epoch = self.global_rank = self.local_rank = 0
        self.world_size, self.is_global_zero = 1, True

    def backward(self, loss, *args, **kwargs):
        loss.backward(*args, **kwargs)

    def log_dict(self, metrics, step=None):
        pass

    def clip_gradients(self, module, optimizer, clip_val=None, max_norm=None, **kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        elif clip_val is not None:
            torch.nn.utils.clip_grad_value_(params, clip_val)

    def __getattr__(self, name):
        raise PlanError(f"the training step reads trainer.{name}, which the planner does not provide")


def _attach(model, optimizers) -> None:
    """Give ``model`` the trainer stand-in its training step talks to (None: take it away)."""
    model._fabric = None if optimizers is None else _TraceFabric([_Stepper(o) for o in optimizers])
    model._fabric_optimizers = [] if model._fabric is None else model._fabric.optimizers


def _optimizers(model) -> list[torch.optim.Optimizer]:
    out = model.configure_optimizers()
    items = out if isinstance(out, (list, tuple)) else [out]
    found = []
    for item in items:
        if isinstance(item, dict):
            item = item["optimizer"]
        if isinstance(item, (list, tuple)):  # ([optimizers], [schedulers])
            found += [o for o in item if isinstance(o, torch.optim.Optimizer)]
            break
        found.append(item)
    return found


def set_checkpointing(model: nn.Module, on: bool) -> int:
    """Switch every network's ``checkpointing`` flag; the number switched."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "checkpointing", None), bool):
            m.checkpointing = on
            n += 1
    return n


def _batch(batch_size: int, image_size: int, dtype: torch.dtype, device) -> dict:
    return {
        "image": torch.zeros(batch_size, 3, image_size, image_size, dtype=dtype, device=device),
        "caption": [LONG_CAPTION] * batch_size,  # the longest: every text encoder fills its maximum length
        "key": [str(i) for i in range(batch_size)],
        "meta": [{} for _ in range(batch_size)],
    }


def _one_step(model, optimizers, batch: dict, mem) -> int:
    """One training step; the bytes alive at the end of its forward pass (automatic optimisation)."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)  # as Lightning does before each step
    if not model.automatic_optimization:
        model.training_step(batch, 0)
        return -1
    out = model.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, dict) else out
    forward_end = mem.live
    loss.backward()
    del out, loss
    for opt in optimizers:
        opt.step()
    return forward_end


def trace_step(model, optimizers, batch: dict) -> StepTrace:
    """A training step of ``model`` on ``batch``, traced at its steady state (the second step, when
    the optimizer state exists): its peak above the weights and the optimizer state, the
    activations kept for the backward, the gradients and the optimizer state."""
    from networks.memory import LiveBytes, on_meta, tensor_bytes

    for opt in optimizers:
        opt.state.clear()  # an earlier trace's state: the first step below remakes it
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    _attach(model, optimizers)
    try:
        with on_meta(), _fused_optimizers_on_meta(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the long caption truncated to the text encoder's length
            with LiveBytes() as first:
                _one_step(model, optimizers, batch, first)
            with LiveBytes() as mem:  # storages from before (weights, state, last gradients) are not counted
                forward_end = _one_step(model, optimizers, batch, mem)
            state = [t for o in optimizers for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            optimizer_state, gradients = tensor_bytes(state), tensor_bytes(p.grad for p in params)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
    finally:
        _attach(model, None)
    activations = forward_end if forward_end >= 0 else mem.peak - gradients  # a manual step: inside its peak
    return StepTrace(peak=mem.peak, activations=activations, gradients=gradients, optimizer_state=optimizer_state)


def largest_block(model: nn.Module, exclude: set[int]) -> tuple[str, int]:
    """The largest block FullyShardedStrategy gathers at once (``lightning_modules.sharding.blocks``
    of the trainable networks: a UNet's res or attention block, a transformer block)."""
    from lightning_modules.sharding import blocks

    names = {id(m): n for n, m in model.named_modules()}
    best = ("", 0)
    for block in blocks(model):
        size = sum(p.numel() * p.element_size() for p in block.parameters() if id(p) not in exclude)
        if size > best[1]:
            best = (f"{names[id(block)]} ({type(block).__name__})", size)
    return best


def plan(args: list[str], batch_size: int | None = None, precision: str | None = None,
         autoencoder_config: str | None = None) -> Plan:  # fmt: skip
    with _untrained_autoencoder(autoencoder_config):
        model, data, trainer = build(args)
    precision = str(precision or trainer.get("precision") or "32-true")
    batch_size = int(batch_size or getattr(data, "batch_size", 0) or 0)
    image_size = int(getattr(data, "image_size", None) or getattr(data, "resolution", None) or 0)
    if not batch_size or not image_size:
        raise PlanError("the datamodule states no batch_size and image_size (or resolution): give --batch_size")
    half = precision.startswith(("bf16", "16"))
    true_half = half and precision.endswith("-true")
    model.train()
    with _fused_optimizers_on_meta():
        optimizers = _optimizers(model)
    in_optimizer = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    named = list(model.named_parameters(remove_duplicate=True))
    is_ema = {id(p) for n, p in named if "ema" in n.split(".")[0] and id(p) not in in_optimizer}
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    trainable = [p for _, p in named if id(p) in in_optimizer]
    ema = [p for _, p in named if id(p) in is_ema]
    frozen = [p for _, p in named if id(p) not in in_optimizer and id(p) not in is_ema]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    result = Plan(
        config=" ".join(args), precision=precision, batch_size=batch_size, image_size=image_size,
        trainable=sum(p.numel() for p in trainable), frozen=sum(p.numel() for p in frozen),
        ema=sum(p.numel() for p in ema), weight_bytes=size(trainable) + size(ema) + size(frozen) + buffers,
        trainable_bytes=size(trainable), ema_bytes=size(ema), frozen_bytes=size(frozen),
        largest_block=largest_block(model, exclude={id(p) for p in frozen + ema}),
    )  # fmt: skip
    batch = _batch(batch_size, image_size, torch.float32, "meta")
    modes = (False, True) if set_checkpointing(model, False) else (False,)
    for on in modes:
        set_checkpointing(model, on)
        t = trace_step(model, optimizers, batch)  # in fp32: autocast has no meta kernels to trace
        if half:  # activations in 16 bits (autocast keeps a few in fp32: a lower estimate); weights,
            # gradients and optimizer state too with a -true precision
            act = lambda n: int(n / 2)  # noqa: E731
            t = StepTrace(peak=act(t.peak - t.gradients) + (act(t.gradients) if true_half else t.gradients),
                          activations=act(t.activations),
                          gradients=act(t.gradients) if true_half else t.gradients,
                          optimizer_state=act(t.optimizer_state) if true_half else t.optimizer_state)  # fmt: skip
        result.traces[on] = t
    if true_half:
        for name in ("weight_bytes", "trainable_bytes", "ema_bytes", "frozen_bytes"):
            setattr(result, name, getattr(result, name) // 2)
        result.largest_block = (result.largest_block[0], result.largest_block[1] // 2)
    return result


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's high-water mark of resident memory to what it holds now (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(args: list[str], batch_size: int | None = None, steps: int = 3) -> tuple[int, int]:
    """``(planned, measured)`` bytes of training memory above the weights on this CPU (fp32): the
    plan's optimizer state and step peak, and how far this process's peak resident memory rises
    over ``steps`` real training steps above where it stood once the model was built (the
    weights are counted exactly, and a model's host-side objects, e.g. a tokenizer's vocabulary,
    are not device memory). Run it in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``, so
    that freed tensors leave the resident set as they leave a device."""
    planned = plan(args, batch_size=batch_size, precision="32-true")
    model, _, _ = build(args, device="cpu")
    model.train()
    optimizers = _optimizers(model)
    batch = _batch(planned.batch_size, planned.image_size, torch.float32, "cpu")
    batch["image"].uniform_(-1, 1)
    _attach(model, optimizers)
    if not _reset_peak_rss():  # the high-water mark from here on, not the build's or the plan's
        raise PlanError("measuring needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    base = _rss()
    from networks.memory import LiveBytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            with LiveBytes() as mem:
                _one_step(model, optimizers, batch, mem)
    peak = _peak_rss()
    t = planned.traces[False]
    return t.optimizer_state + t.peak, peak - base


# ---------------------------------------------------------------------------- report
def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def max_batch(fixed: int, per_sample: float, budget: float) -> int:
    return max(0, int((budget - fixed) // per_sample)) if per_sample > 0 else 0


def report(plan: Plan, gpus: int, gpu_memory: float, headroom: float = 0.10) -> str:
    budget = gpu_memory * GIB * (1 - headroom)
    lines = [
        f"memory plan: {plan.config}",
        f"batch {plan.batch_size} per GPU at {plan.image_size} px, precision {plan.precision}",
        "",
        f"parameters: {plan.trainable / 1e6:,.1f}M trainable ({_gib(plan.trainable_bytes)}), "
        f"{plan.frozen / 1e6:,.1f}M frozen ({_gib(plan.frozen_bytes)}), {plan.ema / 1e6:,.1f}M EMA ({_gib(plan.ema_bytes)})",
    ]
    t0 = plan.traces[False]
    lines += [
        f"gradients: {_gib(t0.gradients)}; optimizer state: {_gib(t0.optimizer_state)}",
        f"largest block (FSDP gathers it): {plan.largest_block[0] or 'none'} {_gib(plan.largest_block[1])}",
        "",
        "| checkpointing | activations kept | step peak above weights | one GPU (DDP) | "
        + " | ".join(f"FSDP x{n}" for n in sorted({2, 8, gpus}))
        + " |",
        "|---|---|---|---|" + "---|" * len(sorted({2, 8, gpus})),
    ]
    for on, t in plan.traces.items():
        lines.append(
            f"| {'on' if on else 'off'} | {_gib(t.activations)} | {_gib(t.peak)} | {_gib(plan.ddp(on))} | "
            + " | ".join(_gib(plan.fsdp(n, on)) for n in sorted({2, 8, gpus}))
            + " |"
        )
    lines += ["", f"GPU: {gpu_memory:g} GiB, {headroom:.0%} kept free for the CUDA context and the allocator", ""]
    verdicts = []
    for name, total in [("DDP", plan.ddp(False)), *([("DDP with checkpointing", plan.ddp(True))] if True in plan.traces else []),
                        (f"FSDP over {gpus}", plan.fsdp(gpus, False)),
                        *([(f"FSDP over {gpus} with checkpointing", plan.fsdp(gpus, True))] if True in plan.traces else [])]:  # fmt: skip
        verdicts.append(f"- {name}: {_gib(total)} per GPU: {'fits' if total <= budget else 'does not fit'}")
    lines += verdicts
    if plan.ddp(False) > budget:
        lines.append("")
        lines.append("to fit:")
        per_sample = plan.traces[False].peak / plan.batch_size
        b = max_batch(plan.ddp(False) - plan.traces[False].peak, per_sample, budget)
        lines.append(f"- a batch of {b} per GPU under DDP (activations scale with it)" if b else
                     "- no batch size fits under DDP: the weights, gradients and optimizer state alone are too large")  # fmt: skip
        if True in plan.traces and plan.ddp(True) <= budget:
            lines.append("- or checkpointing on (checkpointing: true on the networks)")
        n = next((n for n in (2, 4, 8, 16, 32, 64, 128, 256, 512) if plan.fsdp(n, True in plan.traces) <= budget), None)
        if n:
            lines.append(f"- or FSDP over {n} GPUs{' with checkpointing' if True in plan.traces else ''} "
                         "(--trainer configs/trainer/gpu_fsdp.yaml)")  # fmt: skip
        if plan.precision.startswith("32"):
            lines.append("- or precision bf16-mixed (activations in half the bytes)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs to shard over with FSDP (default 8)")
    ap.add_argument("--gpu_memory", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    ap.add_argument("--headroom", type=float, default=0.10, help="share of the GPU kept free (default 0.10)")
    ap.add_argument("--batch_size", type=int, default=None, help="per-GPU batch (default: the datamodule's)")
    ap.add_argument("--precision", default=None, help="32-true, bf16-mixed, bf16-true (default: the trainer's)")
    ap.add_argument("--autoencoder_config", default=None,
                    help="plan a prior or latent diffusion before its autoencoder is trained: the autoencoder this "
                         "config trains stands in for the checkpoint, untrained")  # fmt: skip
    own, rest = ap.parse_known_args(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        ap.error("give the run's --config (and any train.py fit override)")
    if own.gpus < 1 or own.gpu_memory <= 0 or not 0 <= own.headroom < 1:
        ap.error("--gpus must be at least 1, --gpu_memory positive, --headroom in [0, 1)")
    try:
        result = plan(rest, batch_size=own.batch_size, precision=own.precision,
                      autoencoder_config=own.autoencoder_config)  # fmt: skip
    except PlanError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    print(report(result, own.gpus, own.gpu_memory, own.headroom))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
    sys.exit(main())
