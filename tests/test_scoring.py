"""One reward-model layout and one score: what the RM stage trains on, what RL scores with
and what the server answers are the same numbers for the same pair."""

from __future__ import annotations

import pytest
import torch

from serve_helpers import make_reward_checkpoint


def test_train_rl_and_serve_score_a_pair_the_same(random_checkpoint, tmp_path):
    from raystages.data.preference import pad_pairs, rm_converter, scoring_ids
    from raystages.models import load_tokenizer
    from raystages.rl.rewards import RewardModelScorer
    from raystages.serve.scorer import score_padded
    from raystages.spec import PreferenceFieldsSpec
    from raystages.stages.rm import RewardStage, load_reward_model

    ckpt = str(make_reward_checkpoint(random_checkpoint, tmp_path / "rm"))
    tok = load_tokenizer(ckpt)
    prompt, chosen, rejected = "sort: d a c b", "a b c d", "d c b a d"
    pair = rm_converter(PreferenceFieldsSpec(), tok, 256)({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    assert pair["chosen_ids"] == scoring_ids(tok, prompt, chosen)  # one layout
    batch = {k: torch.from_numpy(v) for k, v in pad_pairs([pair], tok.pad_token_id).items()}
    with torch.no_grad():
        trained = torch.cat(RewardStage().rewards(load_reward_model(ckpt, tok).eval(), batch)).tolist()
    # What the server's scorer runs for a request (its batching queue aside: the HTTP test).
    model = load_reward_model(ckpt, tok).eval()
    served = score_padded(model, [scoring_ids(tok, prompt, r) for r in (chosen, rejected)], tok.pad_token_id)
    in_rl = RewardModelScorer(ckpt, retokenize=True, normalize=False).score_texts([prompt] * 2, [chosen, rejected])
    assert abs(trained[0] - trained[1]) > 1e-2  # the two sides differ: equality below means something
    assert served == pytest.approx(trained, abs=1e-5)
    assert in_rl.tolist() == pytest.approx(trained, abs=1e-5)
