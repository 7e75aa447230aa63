"""What a stage gives the shared runner: how to build its model, its loss, and its export."""

from __future__ import annotations

from typing import Any


class Stage:
    """Base of the per-stage hooks. Instances are pickled to every Ray Train worker.

    ``loss`` returns ``(loss, n_items)``: the mean loss of the micro-batch and how many
    items (tokens, pairs) it averaged over, used for held-out means and throughput.
    """

    name: str = "stage"
    throughput_unit: str = "tok"
    frozen: dict = {}  # set per worker from build_frozen
    # Blocks in each rank's local shuffle buffer, reseeded every epoch (raystages.data.order);
    # 0 keeps the dataset's own order (stages whose datasets are shuffled when built).
    shuffle_buffer: int = 0

    def build_model(self, spec, tokenizer):
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[Any, int]:
        raise NotImplementedError

    def count(self, batch: dict) -> int | None:
        """Items of a training micro-batch when micro-batches hold different numbers of them
        (supervised tokens in SFT). If not None, the runner sums it over the optimizer step's
        micro-batches and all ranks before the first backward and calls
        ``loss(model, batch, normalizer=...)``: the loss is then ``sum / normalizer``, which
        makes the step an exact mean over all items (see ``worker._step_normalizer``)."""
        return None

    def build_frozen(self, spec, tokenizer) -> dict:
        """Models the stage reads but never trains (DPO's reference policy), by name. The
        runner builds them once per worker after the trained model, freezes them, places
        them like it (sharded under ZeRO-3: see ``train/engine.py``) and sets
        ``self.frozen`` to them before the first step."""
        return {}

    def train_metrics(self) -> dict:
        """Stage-specific metrics of the last training ``loss`` call (floats or 0-dim
        tensors, e.g. DPO's reward accuracy); the runner averages them over the logging
        window and the ranks and logs them beside the loss."""
        return {}

    def extra_eval(self, model, batches: list[dict]) -> dict[str, float]:
        """Stage-specific held-out metrics beyond the loss (summed over ranks by count)."""
        return {}

    def export(self, model, tokenizer, out_dir: str) -> None:
        """A plain Hugging Face checkpoint: LoRA adapters, if any, merged in."""
        from raystages.models import export_hf, without_adapters

        export_hf(without_adapters(model), tokenizer, out_dir)
