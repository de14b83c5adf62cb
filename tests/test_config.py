"""GRPOConfig / load_config: YAML then CLI overrides (dashes or underscores, boolean flags), values
parsed by field type, unknown keys and invalid values refused with the field's name, save/load."""
import dataclasses

import pytest
import yaml

from mrt_engine.trainer.config import GRPOConfig, load_config, parse_overrides


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def test_trl_defaults():
    c = GRPOConfig()
    assert (c.num_generations, c.beta, c.epsilon, c.epsilon_high, c.loss_type) == (8, 0.0, 0.2, None, "dapo")
    assert (c.importance_sampling_level, c.scale_rewards, c.num_iterations) == ("token", "group", 1)
    assert c.epsilon_high_value == 0.2
    assert c.reward_mode == "outcome"


def test_every_field_documented():
    for f in dataclasses.fields(GRPOConfig):
        assert f.metadata.get("help"), f.name
    text = GRPOConfig.describe()
    assert "--num_generations" in text and "--episode_triggers" in text


def test_yaml_then_cli(tmp_path):
    p = write(tmp_path, {"beta": 0.01, "max_steps": 10, "loss_type": "grpo", "epsilon_high": 0.28,
                         "episode_triggers": ["Wait,", "Alternatively,"]})
    c = load_config(p, ["--beta", "0.04", "--max-steps", "3", "--mask_truncated_completions",
                        "--learning-rate=3e-6", "--resume", "false", "--eval_dataset", "none"])
    assert c.beta == 0.04 and isinstance(c.beta, float)
    assert c.max_steps == 3 and isinstance(c.max_steps, int)
    assert c.loss_type == "grpo" and c.epsilon_high == 0.28
    assert c.mask_truncated_completions is True and c.resume is False
    assert c.learning_rate == 3e-6 and c.eval_dataset is None
    assert c.episode_triggers == ["Wait,", "Alternatively,"]


def test_bool_flag_followed_by_flag():
    o = parse_overrides(["--resume", "--max_steps", "2"])
    assert o == {"resume": True, "max_steps": 2}
    assert parse_overrides(["--resume", "0"]) == {"resume": False}
    assert parse_overrides(["--resume=yes"]) == {"resume": True}


def test_list_override_json_keeps_commas():
    o = parse_overrides(["--episode_triggers", '["Wait,", "But wait,"]'])
    assert o["episode_triggers"] == ["Wait,", "But wait,"]
    assert parse_overrides(["--episode-triggers", "Wait;Hmm"])["episode_triggers"] == ["Wait;Hmm"]


def test_optional_int_and_float_from_yaml_int(tmp_path):
    p = write(tmp_path, {"engine_num_blocks": 64, "learning_rate": 1, "epsilon_high": None})
    c = load_config(p)
    assert c.engine_num_blocks == 64 and c.learning_rate == 1.0 and isinstance(c.learning_rate, float)
    assert c.epsilon_high is None


@pytest.mark.parametrize("args,match", [
    (["--bta", "0.1"], r"'bta'.*did you mean beta"),
    (["--max-step", "3"], r"'max_step'.*max_steps"),
    (["--zzzz", "1"], r"unknown command-line key 'zzzz'$"),
    (["--max_steps"], "missing value"),
    (["max_steps", "3"], "expected an option"),
    (["--max_steps", "three"], "max_steps: expected an int"),
    (["--max_steps", "2.5"], "max_steps: expected an int"),
    (["--beta", "abc"], "beta: expected a number"),
    (["--resume", "maybe"], "got .maybe."),  # a flag takes true/false only
])
def test_bad_cli(args, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, args)


def test_unknown_yaml_key(tmp_path):
    p = write(tmp_path, {"num_generation": 4})
    with pytest.raises(ValueError, match=r"'num_generation'.*num_generations"):
        load_config(p)


def test_yaml_dashed_key_accepted(tmp_path):
    assert load_config(write(tmp_path, {"max-steps": 7})).max_steps == 7


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "", "empty.yaml")) == GRPOConfig()


@pytest.mark.parametrize("field,value", [
    ("loss_type", "ppo"), ("importance_sampling_level", "seq"), ("scale_rewards", "std"),
    ("lr_scheduler_type", "poly"), ("reward_mode", "progress"), ("verifier", "sympy"),
    ("report_to", "wandb"), ("dtype", "fp8"), ("progress_norm", "std"),
    ("num_generations", 1), ("per_device_train_batch_size", 0), ("max_steps", 0),
    ("learning_rate", 0.0), ("warmup_ratio", 1.5), ("epsilon", 1.0), ("epsilon_high", -0.1),
    ("beta", -0.1), ("temperature", 0.0), ("top_p", 0.0), ("top_p", 1.1), ("save_steps", -1),
    ("toy_difficulty", 9), ("alpha", -1.0), ("episode_triggers", []),
    ("progress_k", 0), ("adam_beta2", 1.0), ("max_grad_norm", -1.0), ("seed", -1),
    ("mask_truncated_completions", "maybe"), ("dataset", ""),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**{field: value})


def test_termination_needs_even_groups():
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(reward_mode="mrt_termination", num_generations=3, per_device_train_batch_size=3)
    GRPOConfig(reward_mode="mrt_termination", num_generations=4, per_device_train_batch_size=4)


def test_groups_must_be_whole():
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=3, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    c = GRPOConfig(num_generations=4, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    assert c.generation_batch_size == 8 and c.prompts_per_generation == 2


def test_save_roundtrip(tmp_path):
    c = load_config(None, ["--beta", "0.04", "--episode_triggers", '["Wait,"]', "--alpha", "0.5"])
    path = c.save(str(tmp_path / "sub" / "config.yaml"))
    assert load_config(path) == c
    assert GRPOConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="bogus"):
        GRPOConfig.from_dict({**c.to_dict(), "bogus": 1})


def test_default_model_path():
    from mrt_engine import default_model_path
    assert GRPOConfig().resolved_model_path() == default_model_path()
    assert GRPOConfig(model_name_or_path="/x").resolved_model_path() == "/x"


def test_shipped_configs_load():
    import glob
    import os
    root = os.path.join(os.path.dirname(__file__), "..", "trainer", "configs")
    for path in glob.glob(os.path.join(root, "*.yaml")):
        load_config(path)
