"""Manual optimization of several networks, each with its own optimizer (GAN generator and
discriminator, VQGAN autoencoder and discriminator): building the optimizers and schedulers,
one step of one of them, gradient accumulation, per-network step counts that survive a resume.

Lightning counts every optimizer step in ``trainer.global_step``: a batch that steps two
optimizers advances it by two. ``steps`` counts each network's own steps.

Lightning's ``Trainer(accumulate_grad_batches=...)`` does not apply to manual optimization; the
mixin's own ``accumulate`` does: each network's gradients add up over ``accumulate`` of its
backward passes (each loss divided by ``accumulate``) and its optimizer steps once at the last.
Interleaved networks do not disturb each other's sums, because ``toggled_optimizer`` turns off
the gradients of every parameter its optimizer does not own.
"""

from __future__ import annotations

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn


class ManualOptimization:
    """Mixin for a LightningModule. Call :meth:`init_optimizers` in ``__init__`` and implement
    :meth:`optimizer_parameters`; step with :meth:`step_optimizer` inside
    ``with self.toggled_optimizer(self.optimizer(name))``."""

    steps_key = "optimizer_steps"  # where the per-network step counts go in a checkpoint

    def init_optimizers(
        self,
        factories: dict[str, tuple[OptimizerCallable, LRSchedulerCallable | None]],
        clip_norms: dict[str, float | None] | None = None,
        accumulate: int = 1,
    ) -> None:
        """``factories``: name -> (optimizer factory, scheduler factory or None), in the order of
        ``configure_optimizers``; ``clip_norms``: name -> gradient-norm clipping (None: none);
        ``accumulate``: backward passes per optimizer step, for every network."""
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        self.automatic_optimization = False
        self.factories = dict(factories)
        self.clip_norms = dict(clip_norms or {})
        self.accumulate = accumulate
        self.steps = {name: 0 for name in self.factories}
        self.passes = {name: 0 for name in self.factories}  # backward passes since the last step

    def on_train_start(self) -> None:
        super().on_train_start()
        self.passes = {name: 0 for name in self.factories}  # a fit that ended inside a window leaves none behind

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        """name -> the parameters its optimizer updates."""
        raise NotImplementedError

    def optimizer(self, name: str):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return optimizers[list(self.factories).index(name)]

    def step_optimizer(self, name: str, loss: Tensor) -> bool:
        """Backward of ``loss`` and, at the last of ``accumulate`` passes, optional clipping and
        the step of ``name``'s optimizer and scheduler. Returns whether it stepped."""
        opt = self.optimizer(name)
        if self.passes[name] == 0:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss / self.accumulate)
        self.passes[name] += 1
        if self.passes[name] < self.accumulate:
            return False
        self.passes[name] = 0
        clip = self.clip_norms.get(name)
        if clip is not None:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt.step()
        scheduler = self._schedulers().get(name)
        if scheduler is not None:
            scheduler.step()
        self.steps[name] += 1
        return True

    def _schedulers(self) -> dict:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return {}
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        by_optimizer = {id(self.optimizer(name).optimizer): name for name in self.factories}
        return {by_optimizer[id(s.optimizer)]: s for s in schedulers if id(s.optimizer) in by_optimizer}

    def configure_optimizers(self):
        params = self.optimizer_parameters()
        out = []
        for name, (optimizer_factory, scheduler_factory) in self.factories.items():
            optimizer = optimizer_factory([p for p in params[name] if p.requires_grad])
            entry = {"optimizer": optimizer}
            if scheduler_factory is not None:
                entry["lr_scheduler"] = {"scheduler": scheduler_factory(optimizer), "interval": "step"}
            out.append(entry)
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[self.steps_key] = dict(self.steps)  # pending passes are not saved: a resume starts a window

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.steps.update(checkpoint.get(self.steps_key, {}))
