import pytest

from slimtune.core.errors import ConfigError, UserError
from slimtune.training import config as C


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        C.from_dict(raw)
    return info.value.problems


def test_defaults_build():
    cfg = C.from_dict({"method": {"name": "lora"}})
    assert cfg.method.name == "lora" and cfg.method.r == 16
    assert cfg.data.task == "sentiment" and cfg.train.steps == 60


def test_all_problems_reported_together():
    found = problems(
        {"model": {"nmae": "x"}, "train": {"lr": "fast", "steps": -1}, "method": {"name": "lora", "r": 0}}
    )
    assert any(p.startswith("model.nmae: unknown key (did you mean 'model.name'?)") for p in found)
    assert "train.lr: 'fast' is not a number" in found
    assert "train.steps: -1 must be > 0" in found
    assert "method.r: 0 must be > 0" in found


def test_unknown_method_lists_allowed():
    (p,) = problems({"method": {"name": "dora"}})
    assert p.startswith("method.name: 'dora' is not one of full, lora, qlora")


def test_missing_method_name():
    (p,) = problems({"data": {"task": "sentiment"}})
    assert p.startswith("method.name: missing")


def test_bool_is_not_int_and_int_is_float():
    found = problems({"train": {"steps": True}, "method": {"name": "full"}})
    assert found == ["train.steps: True is not an integer"]
    assert C.from_dict({"train": {"lr": 1}, "method": {"name": "full"}}).train.lr == 1.0


def test_choice_and_data_source_checks(tmp_path):
    found = problems(
        {
            "train": {"schedule": "step"},
            "data": {"task": "nope", "path": str(tmp_path / "x.jsonl")},
            "method": {"name": "qlora", "backend": "gpu"},
        }
    )
    assert "train.schedule: 'step' is not one of cosine, linear, constant" in found
    assert any(p.startswith("data.path: give data.task or data.path, not both") for p in found)
    assert any(p.startswith(f"data.path: '{tmp_path / 'x.jsonl'}': no such file") for p in found)
    assert any(p.startswith("data.task: 'nope' is not one of") for p in found)
    assert "method.backend: 'gpu' is not one of auto, bitsandbytes, torch" in found


def test_unknown_section():
    assert problems({"trian": {}, "method": {"name": "full"}}) == [
        "trian: unknown section (did you mean 'train'?)"
    ]


def test_overrides_nested_and_typed():
    raw = C.parse_overrides(
        [
            "train.lr=1e-4",
            "method.name=lora",
            "method.target_modules=[q_proj,v_proj]",
            "train.max_grad_norm=null",
        ]
    )
    cfg = C.from_dict(raw)
    assert cfg.train.lr == 1e-4 and cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_grad_norm is None
    with pytest.raises(UserError, match="expected dotted.key=value"):
        C.parse_overrides(["train.lr"])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: x\n train: [\n")
    with pytest.raises(UserError, match=r"bad.yaml' line \d+: invalid YAML"):
        C.read_yaml(bad)
    with pytest.raises(UserError, match="no such file"):
        C.read_yaml(tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = C.from_dict({"method": {"name": "qlora", "r": 8}, "train": {"steps": 7}})
    C.save_config(cfg, tmp_path / "c.yaml")
    again = C.load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_output_dir_placeholders_checked():
    found = problems({"train": {"output_dir": "runs/{model}"}, "method": {"name": "lora"}})
    assert found == [
        "train.output_dir: 'runs/{model}' may only use the placeholders {method}, {task}, {time}"
    ]
