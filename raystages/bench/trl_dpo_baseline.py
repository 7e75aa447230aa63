"""TRL's ``DPOTrainer`` (trl==1.13.0) on a given policy and preference rows, timed per
optimizer step: the baseline of ``raystages bench dpo``. Runs in its own virtualenv (the
bench creates it), so TRL never enters the main environment.

    python -m raystages.bench.trl_dpo_baseline POLICY_DIR PAIRS.jsonl BATCH MICRO MAX_LEN BETA STEPS OUT.json
"""

from __future__ import annotations

import json
import sys
import time


def main(policy: str, pairs: str, batch: int, micro: int, max_len: int, beta: float, steps: int, out: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(pairs)]
    # Conversational rows: TRL renders them with the checkpoint's chat template, as ours does.
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    config = DPOConfig(output_dir=out + ".trainer", per_device_train_batch_size=micro,
                       gradient_accumulation_steps=batch // micro, max_steps=steps, learning_rate=1e-4,
                       lr_scheduler_type="constant", beta=beta, loss_type=["sigmoid"], max_length=max_len,
                       use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6,
                       dataloader_num_workers=0, disable_dropout=True)
    tok = AutoTokenizer.from_pretrained(policy)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
                         ref_model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
                         args=config, processing_class=tok, train_dataset=data, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    with open(out, "w") as f:
        json.dump({"step_s": [b - a for a, b in zip([t0] + stamps, stamps)],
                   "trl_version": __import__("trl").__version__}, f)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), float(a[5]), int(a[6]), a[7])
