import pytest
import yaml

from learner.config import POCKET_CONFIG, Config, ConfigError, dump_config, load_config, parse_override, pocket_default


def test_pocket_default_is_the_shipped_file():
    assert pocket_default() == Config.model_validate(yaml.safe_load(POCKET_CONFIG.read_text()))
    assert pocket_default().policy.preset == "pocket"


def test_defaults_are_the_papers_settings():
    alg = Config().algorithm
    assert (alg.learning_rate, alg.clip_eps, alg.group_size, alg.anchors_per_group) == (1e-5, 1e-4, 12, 4)
    assert (alg.updates_per_iteration, alg.perturbation_sigma) == (2, 0.5)
    assert (Config().lora.rank, Config().lora.alpha) == (64, 128)


def test_dotted_overrides_are_typed_yaml_scalars():
    cfg = load_config(None, ["algorithm.learning_rate=3e-4", "run.iterations=7", "algorithm.clip_eps=null"])
    assert cfg.algorithm.learning_rate == pytest.approx(3e-4)
    assert cfg.run.iterations == 7 and cfg.algorithm.clip_eps is None


@pytest.mark.parametrize(
    "override, field",
    [
        ("algorithm.learnin_rate=1", "algorithm.learnin_rate"),
        ("algorithm.group_size=1", "algorithm.group_size"),
        ("algorithm.mode=offline", "algorithm.mode"),
        ("rollout.num_workers=zero", "rollout.num_workers"),
    ],
)
def test_a_bad_field_is_named_in_the_error(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_cross_field_check_names_both_fields():
    with pytest.raises(ConfigError, match="anchors_per_group.*group_size"):
        load_config(None, ["algorithm.anchors_per_group=99"])


def test_a_checkpoint_interval_must_fit_in_the_replay_queue():
    # groups are acked only at checkpoints: 4 groups x (80 + 1) would overfill a 256-group queue
    with pytest.raises(ConfigError, match=r"max_queue_groups \(256\).*groups_per_iteration.*checkpoint_every.*324"):
        load_config(None, ["run.checkpoint_every=80"])
    assert load_config(None, ["run.checkpoint_every=80", "replay.max_queue_groups=324"]).run.checkpoint_every == 80
    assert load_config(None, ["run.checkpoint_every=80", "algorithm.mode=semi_on_policy"]).run.checkpoint_every == 80


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("algorithm.learning_rate")
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/run.yaml")


def test_off_policy_disables_the_clip_and_names_its_adapter():
    cfg = load_config(None, ["algorithm.mode=off_policy"])
    assert cfg.algorithm.effective_clip_eps is None
    assert cfg.algorithm.effective_adapter_name == "off_policy"
    assert load_config(None, []).algorithm.effective_clip_eps == cfg.algorithm.clip_eps


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["reward.weights={TA: 1.0}", "reward.options={normalize: true}"])
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
