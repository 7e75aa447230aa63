"""TRL's PPOTrainer (trl==1.12.0, ``trl.experimental.ppo``) on a given policy / reward model,
timed per PPO iteration: the baseline of ``raystages bench rl``. Runs in its own virtualenv
(the bench creates it), so TRL never enters the main environment.

    python -m raystages.rl.trl_baseline POLICY_DIR RM_DIR BATCH MICRO RESPONSE_LEN EPOCHS ITERS OUT.json
"""

from __future__ import annotations

import json
import sys
import time


def main(policy: str, rm: str, batch: int, micro: int, response_len: int, epochs: int, iters: int, out: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from raystages.task.splits import rl_prompts

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(policy)
    prompts = [r["prompt"] for r in rl_prompts("train", batch * iters)]
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] for p in prompts]
    data = Dataset.from_dict({"input_ids": ids})
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    config = PPOConfig(output_dir=out + ".trainer", per_device_train_batch_size=micro,
                       gradient_accumulation_steps=batch // micro, num_mini_batches=1, num_ppo_epochs=epochs,
                       total_episodes=batch * iters, response_length=response_len, temperature=1.0,
                       local_rollout_forward_batch_size=batch, learning_rate=1e-4, use_cpu=True, report_to=[],
                       save_strategy="no", num_sample_generations=0, stop_token="eos", logging_steps=10**6)
    load = dict(dtype=torch.float32)
    trainer = PPOTrainer(
        args=config, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(policy, **load),
        ref_model=AutoModelForCausalLM.from_pretrained(policy, **load),
        reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, **load),
        value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, **load),
        train_dataset=data, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([t0] + stamps, stamps)]
    with open(out, "w") as f:
        json.dump({"iteration_s": times, "trl_version": __import__("trl").__version__}, f)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]), int(a[6]), a[7])
