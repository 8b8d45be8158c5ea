"""`sparta bench slack`: every bound it reports is >= the truth it is compared with, the ball tightens the
box where keys cluster, the capture is each layer's last-position attention, and bad options are refused."""
from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from pipelines.bench import slack
from pipelines.cli import app

TOL = 1e-4


def captured(seed=0, hq=6, hkv=2, t=512, d=32, spread=1.0, heavy_sink=8.0) -> slack.Captured:
    """Keys around a per-head centre (`spread` their noise), sinks `heavy_sink` nats up, values with a bias."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, d, generator=g)
    centre = torch.randn(hkv, 1, d, generator=g)
    k = centre + spread * torch.randn(hkv, t, d, generator=g)
    direction = q.view(hkv, hq // hkv, d).mean(1, keepdim=True)
    k[:, :4] += heavy_sink * math.sqrt(d) * direction / direction.norm(dim=-1, keepdim=True) ** 2
    v = 2.0 + torch.randn(hkv, t, d, generator=g)
    return slack.Captured(0, q, k, v, d ** -0.5)


@pytest.mark.parametrize("spread", [1.0, 0.05])
def test_every_bound_is_at_least_the_truth(spread):
    cfg = slack.SlackConfig(prompts=1, context=512, block_size=32, fractions=(0.3, 0.7))
    sample = slack.measure(captured(spread=spread), cfg)
    for name, gap in sample.bound_gap.items():
        assert gap.min() >= -TOL, (name, gap.min())
    for key, ratio in sample.mass_ratio.items():
        assert ratio.min() >= 1 - TOL, (key, ratio.min())
    for key, ratio in sample.error_ratio.items():
        assert ratio.min() >= 1 - TOL, (key, ratio.min())
    # the minimum of two bounds is never looser than the box alone
    assert (sample.bound_gap["box+ball"] <= sample.bound_gap["box"] + TOL).all()


def test_the_ball_tightens_clustered_keys_and_values_tighten_the_error():
    cfg = slack.SlackConfig(prompts=1, context=512, block_size=32, fractions=(0.5,))
    sample = slack.measure(captured(spread=0.05), cfg)
    box, both = sample.bound_gap["box"], sample.bound_gap["box+ball"]
    assert (both < box - 1e-6).float().mean() >= 0.9 and both.median() < 0.8 * box.median()
    # biased values: 2 max||v|| is far above what the value balls allow
    aware = sample.error_ratio[(0.5, "box+ball", "value-aware")].median()
    assert aware < 0.5 * sample.error_ratio[(0.5, "box+ball", "2 W max|v|")].median()


def test_settings_run_end_to_end_and_certificates_hold():
    caps = [captured(seed=s, spread=0.05) for s in range(2)]
    rows = {r.art: r for r in (slack.run_setting(text, caps, 32) for text in
                                ("certified", "certified+score_bound=box+ball+certificate=relative+eps=0.05",
                                 "skip+skip_lambda=1"))}
    tight = rows["certified+score_bound=box+ball+certificate=relative+eps=0.05"]
    assert tight.visited < rows["certified"].visited <= 1.0   # clustered keys: the ball lets it stop
    assert tight.checked == 2 * 6 and tight.violations == 0 and tight.max_rel_error <= 0.05
    assert rows["skip+skip_lambda=1"].checked == 0 and rows["skip+skip_lambda=1"].visited < 1.0


def test_the_capture_is_each_layers_last_position_attention():
    from workers.data.assets import load_model

    model, _ = load_model("random:llama-tiny", task="causal_lm", dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), slack.capturing(model) as sink:
        model(input_ids=ids, use_cache=False)
    assert [c.layer for c in sink] == list(range(model.config.num_hidden_layers))
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    for c in sink:
        assert c.q.shape == (hq, c.k.shape[-1]) and c.k.shape == c.v.shape == (hkv, 40, c.k.shape[-1])
    assert model.config._attn_implementation != slack.CAPTURE   # restored


@pytest.mark.parametrize("args, option", [(["--fractions", "1.5"], "--fractions"),
                                          (["--art", "certified+score_bound=sphere"], "--art"),
                                          (["--context", "64"], "--context")])
def test_bad_options_name_the_option(args, option):
    result = CliRunner().invoke(app, ["bench", "slack", *args])
    assert result.exit_code == 2 and option in result.output, result.output
