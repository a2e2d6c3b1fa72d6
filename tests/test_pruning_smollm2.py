"""One check on the real model: 30% Taylor pruning of smollm2-135m gives the expected shapes and counts."""
import math

from rora.config import PruneConfig
from rora.models import load_model
from rora.pruning.prune import prune
from rora.architecture import LayerShape, layer_shapes


def test_smollm2_taylor_30_percent():
    model, tok = load_model("smollm2-135m")  # a fresh copy: the session fixture must stay unpruned
    config = PruneConfig(ratio=0.3, importance="taylor", num_samples=2, holdout_samples=2, seq_len=32)
    report = prune(model, tok, config)
    # 9 heads over 3 KV groups: round(0.3 * 3) = 1 query head per group; round(0.3 * 1536) = 461 channels.
    assert layer_shapes(model) == [LayerShape(6, 3, 1075)] * 30
    per_layer = 2 * 3 * 64 * 576 + 3 * 461 * 576  # q rows + o columns of 3 heads; gate/up rows + down columns
    assert report.params_before - report.params_after == 30 * per_layer == 30_533_760
    assert report.actual["q_heads"] == round(1 / 3, 6) and report.actual["channels"] == round(461 / 1536, 6)
    assert report.standard_config and model.config.num_attention_heads == 6 and model.config.head_dim == 64
    assert math.isfinite(report.loss_before) and math.isfinite(report.loss_after)
    assert report.loss_after > report.loss_before  # no recovery yet: pruning hurts
