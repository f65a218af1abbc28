"""The ``saq_strategy`` choices: which optimizer steps run SAQ, and how a SAQ micro-batch step is taken.

Cost model (one step = one micro-batch's forward + backward):

    full        2 forward+backward per step (ascent, then descent at the perturbed point)
    every_k     full SAQ on every k-th optimizer step, plain QAT on the others: (k + 1) / k on average
    looksam     as every_k, but the other steps add back the sharpness component kept from the last full step
                (LookSAM, per tensor): (k + 1) / k on average plus one norm and one multiply-add per tensor
    reuse_grad  1 forward+backward per step plus one vector operation: ε comes from the gradient of the
                previous descent pass; the first step is plain QAT (a resume restores the kept gradient)

Memory on top of QAT: ε (one copy of the perturbed tensors) while the descent pass runs, and for
``reuse_grad`` the kept gradient (a second copy); ``looksam`` keeps one sharpness component per trainable tensor (one
copy of the trainable parameters) and, during a full step, the clean and perturbed gradients of the micro-batch and
their sums over the step's micro-batches (freed after the step). Case 2 and ``θ`` keep a copy of the values they restore.

A strategy is a class in ``STRATEGIES`` (the names ``saq_strategy`` accepts), built once per trainer from its
arguments. ``SAQTrainer`` asks it whether a step is plain QAT and otherwise hands it the micro-batch with
``trainer.sharpness`` built; the strategy takes the step with ``trainer.saq_step`` (the two-pass step),
``trainer.qat_step`` (the stock one) and ``trainer.epsilon``. What it keeps between steps goes into every
checkpoint, one file per process, through ``state_dict`` / ``load_state_dict``.
"""

import torch


class SAQStrategy:
    """Full SAQ on every step; the base of the other strategies."""

    # What the first step after a resume is when the checkpoint holds no state file; None: nothing is kept.
    resumes_without_state: str | None = None

    def __init__(self, args):
        self.args = args

    def is_plain_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (once SAQ has started) is plain QAT, with no perturbation built."""
        return False

    def training_step(self, trainer, model, inputs, num_items_in_batch) -> torch.Tensor:
        """One micro-batch of a SAQ step; ``trainer.sharpness`` is built for ``model``."""
        return trainer.saq_step(model, inputs, num_items_in_batch)[0]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What this process keeps between steps, as safetensors' tensors and string metadata."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        pass


class EveryK(SAQStrategy):
    """Full SAQ on optimizer steps 0, k, 2k, ...; plain QAT on the others."""

    def is_plain_step(self, step: int) -> bool:
        return step % self.args.saq_interval != 0


class LookSAM(SAQStrategy):
    """Full SAQ on every k-th step, which keeps each tensor's sharpness component; the steps in between are plain
    QAT with that component re-added (docs/METHOD.md, "Efficient strategies")."""

    resumes_without_state = "full SAQ"

    def __init__(self, args):
        super().__init__(args)
        # The tensors it corrects (those of the perturbation ``_params_for``), their kept directions, the optimizer
        # step that built them, and that step's running sums of plain gradients and orthogonal components.
        self.params: list[torch.nn.Parameter] = []
        self._params_for = None
        self.directions: list | None = None
        self.built_at: int | None = None
        self._sums: list | None = None

    def is_full_step(self, step: int) -> bool:
        # Every micro-batch of a full optimizer step is full, also the step that rebuilds the directions on resume.
        return self.directions is None or step % self.args.saq_interval == 0 or self.built_at == step

    def training_step(self, trainer, model, inputs, num_items_in_batch):
        if self._params_for is not trainer.sharpness:
            # Clean step sizes get the same gradient in both passes: nothing to correct there.
            skip = {id(p) for p in trainer.clean_step_sizes}
            self.params = [p for p in trainer.sharpness.model.parameters() if p.requires_grad and id(p) not in skip]
            self._params_for = trainer.sharpness
        step = trainer.state.global_step
        if not self.is_full_step(step):
            return self._cheap_step(trainer, model, inputs, num_items_in_batch)
        loss, plain, perturbed = trainer.saq_step(model, inputs, num_items_in_batch, compared=self.params)
        self._keep_sharpness_direction(plain, perturbed, step)
        return loss

    @torch.no_grad()
    def _keep_sharpness_direction(self, plain, perturbed, step: int) -> None:
        """LookSAM, per tensor: ``g_v = g_s - (<g_s, g> / ||g||²) g``, the part of the SAQ gradient ``g_s`` that is
        orthogonal to the plain gradient ``g``, kept as ``g_v / ||g||`` (both summed over the micro-batches of the
        full step), so the steps in between re-add it in proportion to their own gradient. A micro-batch whose
        gradients overflowed (fp16) leaves what is kept as it was."""
        if self.built_at != step:
            self._sums, self.built_at = None, step
        pairs = [(i, g.float(), s.float()) for i, (g, s) in enumerate(zip(plain, perturbed))
                 if g is not None and s is not None]
        if not pairs:
            return
        index, g, s = zip(*pairs)
        g_norms = torch._foreach_norm(list(g))
        dots = [torch.vdot(a.flatten(), b.flatten()) for a, b in zip(s, g)]
        # torch.where, not a Python branch: no host sync per tensor. A zero gradient keeps nothing.
        coefficients = [torch.where(n > 0, d / (n * n), torch.zeros_like(d)) for d, n in zip(dots, g_norms)]
        orthogonal = torch._foreach_sub(list(s), torch._foreach_mul(list(g), coefficients))
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(list(orthogonal) + list(g)))).all()):
            return
        sums = self._sums or [None] * len(plain)
        for i, plain_i, v in zip(index, g, orthogonal):
            sums[i] = (plain_i, v) if sums[i] is None else (sums[i][0] + plain_i, sums[i][1] + v)
        self._sums = sums
        self.directions = [None if pair is None else pair[1] / torch.where(n > 0, n, torch.ones_like(n))
                           for pair, n in zip(sums, (None if pair is None else torch.linalg.vector_norm(pair[0])
                                                     for pair in sums))]

    def _cheap_step(self, trainer, model, inputs, num_items_in_batch):
        """Plain QAT forward-backward; each kept tensor's gradient ``g`` becomes ``g + alpha·||g||·v`` (``v`` its
        kept ``g_v / ||g||``) before it is accumulated, so accumulation and data-parallel all-reduce are unchanged."""
        self._sums = None  # the full step's running sum is not needed once it is over
        alpha = self.args.saq_looksam_alpha

        def add(direction):
            calls = []

            def hook(grad):
                # The correction scales with the norm of the tensor's whole gradient: a gradient delivered in parts
                # (a tensor shared by two blocks that reentrant activation checkpointing recomputes) has none here.
                if calls:
                    raise RuntimeError("saq_strategy='looksam' needs each parameter's gradient in one piece, but one "
                                       "arrived in parts (a parameter shared between checkpointed blocks): use "
                                       "activation checkpointing with use_reentrant=False, or another saq_strategy")
                calls.append(True)
                return grad + (alpha * torch.linalg.vector_norm(grad.float())).to(grad.dtype) * direction.to(grad.dtype)

            return hook

        handles = [p.register_hook(add(v)) for p, v in zip(self.params, self.directions) if v is not None and alpha > 0]
        try:
            return trainer.qat_step(model, inputs, num_items_in_batch)
        finally:
            for handle in handles:
                handle.remove()

    def state_dict(self):
        metadata = {"looksam_built_at": str(self.built_at)}
        return _pack("looksam", self.directions, metadata)

    def load_state_dict(self, tensors, metadata):
        self.directions = _unpack("looksam", tensors, metadata)
        built_at = metadata.get("looksam_built_at", "None")
        self.built_at = None if built_at == "None" else int(built_at)


class ReuseGrad(SAQStrategy):
    """One pass per step: ε from the previous step's descent gradient; a step with none kept is plain QAT."""

    resumes_without_state = "plain QAT"

    def __init__(self, args):
        super().__init__(args)
        self.previous_descent_grads: list | None = None

    def training_step(self, trainer, model, inputs, num_items_in_batch):
        previous, self.previous_descent_grads = self.previous_descent_grads, None
        eps = trainer.epsilon(previous) if previous is not None else None
        del previous
        with trainer.sharpness.perturbed(eps), trainer.sharpness.recording_gradients() as grads:
            loss = trainer.qat_step(model, inputs, num_items_in_batch)
        self.previous_descent_grads = grads
        return loss

    def state_dict(self):
        return _pack("reuse_grad", self.previous_descent_grads, {})

    def load_state_dict(self, tensors, metadata):
        self.previous_descent_grads = _unpack("reuse_grad", tensors, metadata)


def _pack(prefix: str, kept: list | None, metadata: dict[str, str]):
    """A list of tensors with ``None`` holes as ``{prefix.i: tensor}``, its length in ``metadata[prefix_size]``."""
    tensors = {f"{prefix}.{i}": t.detach().contiguous() for i, t in enumerate(kept or []) if t is not None}
    return tensors, {**metadata, f"{prefix}_size": str(len(kept or []))}


def _unpack(prefix: str, tensors, metadata) -> list | None:
    # A file another strategy wrote has no size of this one's: nothing kept.
    size = int(metadata.get(f"{prefix}_size", "0"))
    return [tensors.get(f"{prefix}.{i}") for i in range(size)] if size else None


STRATEGIES: dict[str, type[SAQStrategy]] = {
    "full": SAQStrategy,
    "every_k": EveryK,
    "looksam": LookSAM,
    "reuse_grad": ReuseGrad,
}
