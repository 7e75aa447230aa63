"""Frozen models on a training worker: read every step, never trained (DPO's reference policy).

Placed like the trained model so that a model that only fits sharded still fits twice:
under ZeRO-3 a frozen model is a DeepSpeed engine without an optimizer, its parameters
partitioned over the ranks and gathered layer by layer in the forward pass (as OpenRLHF and
DeepSpeed-Chat hold their reference models); under ZeRO 0-2 it is a plain copy per rank.
"""

from __future__ import annotations


def frozen_deepspeed_config(spec) -> dict:
    """An inference-only ZeRO-3 config matching the trained model's precision and offload."""
    zero: dict = {"stage": 3}
    if spec.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": spec.scaling.use_gpu}
    return {"train_micro_batch_size_per_gpu": spec.optim.micro_batch_size,
            "zero_optimization": zero, "bf16": {"enabled": spec.optim.precision == "bf16"},
            "steps_per_print": 10**9}


def freeze(model, spec, device):
    """``model`` with gradients off, in eval mode, on ``device`` (sharded under ZeRO-3)."""
    model.requires_grad_(False)
    model.eval()
    if spec.deepspeed.zero_stage == 3:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=frozen_deepspeed_config(spec))
        engine.eval()
        return engine
    return model.to(device)
