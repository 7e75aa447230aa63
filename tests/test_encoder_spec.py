"""Spec checks of the encoder half: objective vs model, masking fractions, task heads."""

from __future__ import annotations

import pytest

from raystages.spec import SpecError, load_spec
from tests.conftest import ROOT


def test_pretrain_objective_defaults_to_causal_and_mlm_needs_an_encoder():
    spec = load_spec(None, [], stage="pretrain")
    assert spec.objective == "causal" and spec.mlm.mask_prob == 0.15
    mlm = load_spec(ROOT / "jobs" / "pretrain-mlm.yaml", ["data.source=builtin", "data.val_source="])
    assert (mlm.objective, mlm.model.preset) == ("mlm", "bert-tiny")
    with pytest.raises(SpecError, match="needs an encoder"):
        load_spec(None, ["objective=mlm"], stage="pretrain")
    with pytest.raises(SpecError, match="is an encoder: set objective=mlm"):
        load_spec(None, ["model.preset=bert-nano"], stage="pretrain")
    with pytest.raises(SpecError, match="mask_token_frac \\+ random_token_frac"):
        load_spec(None, ["objective=mlm", "model.preset=bert-nano", "mlm.mask_token_frac=0.95"],
                  stage="pretrain")
    with pytest.raises(SpecError, match="mlm.mask_prob"):
        load_spec(None, ["objective=mlm", "model.preset=bert-nano", "mlm.mask_prob=0"], stage="pretrain")


def test_bert_presets_are_bert_configs_with_their_context():
    from raystages.models import ENCODER_PRESETS, preset_config

    assert set(ENCODER_PRESETS) == {"bert-nano", "bert-tiny", "bert-small"}
    config = preset_config("bert-tiny", 1000)
    assert config.model_type == "bert" and (config.num_hidden_layers, config.hidden_size) == (2, 128)
    with pytest.raises(SpecError, match="exceeds the model's context of 256"):
        load_spec(None, ["objective=mlm", "model.preset=bert-nano", "optim.seq_len=512"], stage="pretrain")
