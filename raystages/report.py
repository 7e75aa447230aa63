"""The pipeline's run report: ``report.md`` with per-stage results, PNG plots (loss curves,
reward-model accuracy, RL reward and KL per iteration) and the same held-out prompts
answered by the pretrained, SFT, DPO and RL models, each answer scored by the reward model and
the task's oracle — the four-stage journey side by side."""

from __future__ import annotations

import json
from pathlib import Path

from raystages import atomic
from raystages.pipeline import SCRATCH

MODELS = ("pretrain", "sft", "dpo", "rl")


def _metrics_log(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows, the last row per step kept (a resumed run logs some steps twice)."""
    path = run_dir / "metrics.jsonl"
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


RL_SMOOTHING = 8  # iterations in the running mean of the RL reward plot


def running_mean(values: list[float] | tuple[float, ...], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plots(root: Path, stages: list[str]) -> list[str]:
    """Write the PNGs; returns their file names (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    curves = {s: _metrics_log(root / s) for s in stages}
    train = [s for s in ("pretrain", "sft", "rm", "dpo") if curves.get(s)]
    if train:
        fig, axes = plt.subplots(1, len(train), figsize=(4.5 * len(train), 3.5), squeeze=False)
        for ax, s in zip(axes[0], train):
            for key in ("loss", "val_loss"):
                pts = [(r["step"], r[key]) for r in curves[s] if key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="." if key == "val_loss" else None, label=key)
            ax.set_title(f"{s}: loss"), ax.set_xlabel("step"), ax.legend()
        fig.tight_layout(), fig.savefig(root / "loss.png", dpi=90), plt.close(fig)
        out.append("loss.png")
    acc = [(r["step"], r["val_pair_accuracy"]) for r in curves.get("rm", []) if "val_pair_accuracy" in r]
    if acc:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot(*zip(*acc), marker="o"), ax.set_ylim(0, 1.05)
        ax.set_title("reward model: held-out pair accuracy"), ax.set_xlabel("step")
        fig.tight_layout(), fig.savefig(root / "rm_accuracy.png", dpi=90), plt.close(fig)
        out.append("rm_accuracy.png")
    rl = curves.get("rl", [])
    if rl:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for key in ("reward", "reward_oracle"):
            pts = [(r["step"], r[key]) for r in rl if key in r]
            if pts:
                # Each iteration draws new prompts, whose difficulty varies more than the
                # policy does between two iterations: the trend is in the running mean.
                line, = axes[0].plot(*zip(*pts), marker=".", alpha=0.35, linewidth=0.8)
                steps, values = zip(*pts)
                axes[0].plot(steps, running_mean(values, RL_SMOOTHING), color=line.get_color(),
                             label=f"{key} (mean of {RL_SMOOTHING})")
        axes[0].set_title("RL: reward per iteration"), axes[0].legend()
        pts = [(r["step"], r["kl_ref"]) for r in rl if "kl_ref" in r]
        if pts:
            axes[1].plot(*zip(*pts), marker=".", color="tab:red")
        axes[1].set_title("RL: KL to the reference")
        for ax in axes:
            ax.set_xlabel("iteration")
        fig.tight_layout(), fig.savefig(root / "rl.png", dpi=90), plt.close(fig)
        out.append("rl.png")
    return out


def answers(exports: dict[str, str], prompts: list[str], max_new_tokens: int) -> dict[str, list[str]]:
    """Greedy answers per model: the pretrained model completes ``prompt =`` as in its
    corpus; the SFT and RL models answer the prompt as a chat turn."""
    from raystages.generate import greedy_complete

    out = {}
    for name, path in exports.items():
        if name == "pretrain":
            raw = greedy_complete(path, [p + " =" for p in prompts], max_new_tokens)
        else:
            raw = greedy_complete(path, prompts, max_new_tokens, chat=True)
        out[name] = [a.split("\n")[0].strip() for a in raw]
    return out


def rm_scores(rm_export: str, prompts: list[str], replies: list[str]) -> list[float]:
    """Reward-model scores of (prompt, reply) as one user and one assistant turn."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from raystages.models import load_tokenizer
    from raystages.data.preference import scoring_ids

    tok = load_tokenizer(rm_export)
    model = AutoModelForSequenceClassification.from_pretrained(rm_export, use_safetensors=True).eval()
    scores = []
    with torch.no_grad():
        for p, r in zip(prompts, replies):
            ids = torch.tensor([scoring_ids(tok, p, r)])
            scores.append(model(input_ids=ids).logits[0, 0].item())
    return scores


def side_by_side(pipe, state: dict) -> tuple[str, dict]:
    """(Markdown table, per-model means) over held-out task prompts."""
    from raystages.task import reward
    from raystages.task.splits import rl_prompts

    exports = {m: state["stages"][m]["export"] for m in MODELS if m in state["stages"]}
    # The RL stage's task settings (seed, lengths): the prompts it was tuned and judged on.
    task = (pipe.stages.get("rl") or pipe.stages.get("dpo") or pipe.stages.get("sft") or {}).get("data", {}).get("builtin", {})
    lengths = {k: task[k] for k in ("min_len", "max_len") if k in task}
    rows = rl_prompts("val", pipe.report.prompts, task.get("seed", 0), **lengths)
    prompts = [r["prompt"] for r in rows]
    said = answers(exports, prompts, pipe.report.max_new_tokens)
    rm = state["stages"].get("rm", {}).get("export")
    scores = {m: rm_scores(rm, prompts, said[m]) if rm else [None] * len(prompts) for m in said}
    oracle = {m: [reward(p, a) for p, a in zip(prompts, said[m])] for m in said}
    head = "| prompt | expected | " + " | ".join(f"{m} (RM · oracle)" for m in said) + " |"
    lines = [head, "|" + "---|" * (2 + len(said))]
    fmt = lambda s: "–" if s is None else f"{s:+.2f}"
    for i, r in enumerate(rows):
        cells = [f"`{said[m][i] or '∅'}` ({fmt(scores[m][i])} · {oracle[m][i]:.2f})" for m in said]
        lines.append(f"| `{r['prompt']}` | `{r['answer']}` | " + " | ".join(cells) + " |")
    means = {m: {"oracle": sum(oracle[m]) / len(prompts),
                 "rm": (sum(scores[m]) / len(prompts)) if rm else None} for m in said}
    lines.append("| **mean** | | " + " | ".join(f"**{fmt(means[m]['rm'])} · {means[m]['oracle']:.2f}**" for m in said) + " |")
    return "\n".join(lines) + "\n", means


HEAD_METRICS = ("held_out_accuracy", "held_out_macro_f1", "held_out_entity_f1", "held_out_entity_precision",
                "held_out_entity_recall")


def scratch_table(state: dict) -> str:
    """Markdown: each held-out SFT figure from the pretrained checkpoint and from scratch."""
    pretrained, scratch = (state["stages"][s].get("metrics") or {} for s in ("sft", SCRATCH))
    lines = ["| held-out figure | from scratch | from the pretrained checkpoint | difference |", "|---|---|---|---|"]
    for k in ("accuracy_after", *HEAD_METRICS):
        if isinstance(pretrained.get(k), (int, float)) and isinstance(scratch.get(k), (int, float)):
            lines.append(f"| {k.removeprefix('held_out_')} | {scratch[k]:.3f} | {pretrained[k]:.3f} | "
                         f"{pretrained[k] - scratch[k]:+.3f} |")
    return "\n".join(lines) + "\n"


def answers_builtin_prompts(pipe) -> bool:
    """Whether the pipeline's models answer the built-in task's chat prompts: not after
    pretraining on other data or masked-LM pretraining, nor after a task-head SFT (given
    checkpoints are taken to be causal LMs of the built-in task)."""
    runs = {s for s in ("pretrain", "sft") if s in pipe.stages and pipe.checkpoint_of(s) is None}
    if "pretrain" in runs:
        pretrain = pipe.stage_spec("pretrain")
        if pretrain.data.source != "builtin" or pretrain.objective != "causal":
            return False
    return not ("sft" in runs and pipe.stage_spec("sft").sft.task != "chat")


def write_report(pipe, state: dict) -> Path:
    root = pipe.root()
    stages = list(state["stages"])
    md = [f"# raystages pipeline `{pipe.name}`\n", f"Runs under `{root}`.\n", "## Stages\n",
          "| stage | status | wall s | key metrics | checkpoint |", "|---|---|---|---|---|"]
    keys = ("val_loss", "val_masked_accuracy", "accuracy_before", "accuracy_after", *HEAD_METRICS,
            "pair_accuracy", "val_reward_accuracy", "reward_before", "reward_after", "kl_ref")
    for s in stages:
        st = state["stages"][s]
        m = st.get("metrics") or {}
        shown = ", ".join(f"{k} {m[k]:.3g}" for k in keys if isinstance(m.get(k), (int, float)))
        md.append(f"| {s} | {st['status']} | {st.get('wall_s', '')} | {shown} | `{st['export']}` |")
    pngs = plots(root, [s for s in stages if state["stages"][s]["status"] != "given"]) if pipe.report.plots else []
    if pngs:
        md += ["", "## Curves", ""] + [f"![{p}]({p})" for p in pngs]
    elif pipe.report.plots:
        md += ["", "_Plots need matplotlib (`pip install matplotlib`)._"]
    if pipe.from_scratch and SCRATCH in state["stages"]:
        md += ["", "## What pretraining is worth", "",
               f"The same SFT spec and budget from the pretrained checkpoint (`sft`) and from fresh weights of "
               f"its architecture and tokenizer (`{SCRATCH}`), on the same held-out data.", "",
               scratch_table(state)]
    means = {}
    if pipe.report.prompts and answers_builtin_prompts(pipe) and any(m in state["stages"] for m in MODELS):
        table, means = side_by_side(pipe, state)
        md += ["", "## The same held-out prompts, stage by stage", "",
               "Each answer is greedy; scored by the reward model (logit) and the task's oracle (1.0 = exact).", "",
               table]
    atomic.write_text(root / "report.md", "\n".join(md) + "\n")
    atomic.write_text(root / "report.json", json.dumps({"stages": state["stages"], "side_by_side_means": means,
                                                        "plots": pngs}, indent=2, default=str))
    return root / "report.md"
