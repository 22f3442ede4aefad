import pytest

from unlearn.core.errors import UserError
from unlearn.training.config import load_run_config


def test_precedence_defaults_then_component_yaml_then_flags_then_set(tmp_path):
    user = tmp_path / "exp.yaml"
    user.write_text("train: {max_steps: 7}\noptimizer: {name: adamw, lr: 3.0e-5}\n")
    cfg = load_run_config("npo", None, user, {"train.batch_size": 2}, ["method.beta=0.5", "optimizer.lr=1e-4"])
    assert cfg.method == {"beta": 0.5, "gamma": 1.0, "alpha": 2.0, "name": "npo"}
    assert cfg.optimizer["name"] == "adamw" and cfg.optimizer["lr"] == 1e-4  # 1e-4 parsed as a float
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == 2


def test_cli_name_drops_options_of_another_component(tmp_path):
    user = tmp_path / "exp.yaml"
    user.write_text("optimizer: {name: adamw, weight_decay: 0.1}\n")
    cfg = load_run_config("npo", "zo", user)
    assert cfg.optimizer["name"] == "zo" and "weight_decay" in cfg.optimizer
    assert cfg.optimizer["weight_decay"] == 0.0  # zo's own default, not adamw's 0.1


@pytest.mark.parametrize("text, message", [
    ("train: [1, 2\n", "malformed YAML"),
    ("- a list\n", "must hold a mapping"),
    ("train: {max_stepz: 3}\n", "unknown key(s) in 'train': max_stepz"),
    ("bogus: 1\n", "unknown top-level config key(s): bogus"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config("npo", "adamw", path)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="expects key.path=value"):
        load_run_config("npo", "adamw", overrides=["no_equals_sign"])
    with pytest.raises(UserError, match="does not exist"):
        load_run_config("npo", "adamw", tmp_path / "missing.yaml")


def test_method_run_recipe_sits_below_user_settings():
    cfg = load_run_config("rmu")
    assert cfg.optimizer["name"] == "adamw" and cfg.optimizer["lr"] == 1e-3 and cfg.train.max_steps == 150
    assert "run" not in cfg.method
    cfg = load_run_config("rmu", flags={"optimizer.lr": 5e-4, "train.max_steps": 10})
    assert cfg.optimizer["lr"] == 5e-4 and cfg.train.max_steps == 10
    cfg = load_run_config("rmu", "zo")  # another optimizer: its own defaults, not the recipe's lr
    assert cfg.optimizer["name"] == "zo" and cfg.optimizer["lr"] == 1e-5
    assert load_run_config("npo").train.max_steps == 60
