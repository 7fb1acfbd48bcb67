import re

import pytest
import yaml

from controller.config import (
    POCKET_CONFIG,
    Config,
    ConfigError,
    check_reward_settings,
    dump_config,
    load_config,
    parse_override,
    pocket_default,
    redact_secrets,
)


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


@pytest.mark.parametrize(
    "override, field, problem",
    [
        ("run.iterations=true", "run.iterations", "a boolean is not a number"),
        ("run.iterations=3.5", "run.iterations", "fractional part"),
        ("algorithm.learning_rate=.inf", "algorithm.learning_rate", "finite number"),
        ("algorithm.learning_rate=true", "algorithm.learning_rate", "a boolean is not a number"),
        ("reward.timeout_s=.inf", "reward.timeout_s", "finite number"),
        ("reward.num_actors=false", "reward.num_actors", "a boolean is not a number"),
        ("reward.weights={VQ: .nan}", "reward.weights.VQ", "finite number"),
        ("algorithm.tau=-.inf", "algorithm.tau", "finite number"),
        ("algorithm.nft_selective_reg=1", "algorithm.nft_selective_reg", "valid boolean"),
    ],
)
def test_wrong_kinds_and_infinities_are_refused_with_the_field_named(override, field, problem):
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}: .*{problem}"):
        load_config(None, [override])


def test_integers_are_still_accepted_where_a_real_number_is_expected():
    cfg = load_config(None, ["algorithm.learning_rate=1", "reward.weights={TA: 2}", "algorithm.tau=3"])
    assert cfg.algorithm.learning_rate == 1.0 and cfg.reward.weights == {"TA": 2.0} and cfg.algorithm.tau == 3.0


def test_every_shipped_config_loads():
    for path in sorted(POCKET_CONFIG.parent.glob("*.yaml")):
        assert load_config(path).policy.preset, path


def test_malformed_yaml_is_reported_by_path_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  learning_rate: 1e-4\n  group_size: 4: 5\nrun:\n  iterations: 2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:3:\d+: malformed YAML: mapping values are not allowed") as err:
        load_config(path)
    assert "<unicode string>" not in str(err.value)
    with pytest.raises(ConfigError, match="override run.iterations: the value is not valid YAML"):
        load_config(None, ["run.iterations=[1,"])


def test_reward_model_and_heads_are_checked_without_building_the_model():
    heads = check_reward_settings(load_config(None, ["reward.weights={TA: 1.0}"]).reward)
    assert heads == ("VQ", "MQ", "TA")
    with pytest.raises(ConfigError, match=r"reward\.weights: 'XQ' is not a head of reward model 'pocket' \(its heads: VQ, MQ, TA\)"):
        check_reward_settings(load_config(None, ["reward.weights={VQ: 1.0, XQ: 1.0}"]).reward)
    cfg = load_config(None, ["algorithm.nft_aux_heads=[VQ, TQ]"])
    with pytest.raises(ConfigError, match=r"algorithm\.nft_aux_heads: 'TQ' is not a head"):
        check_reward_settings(cfg.reward, cfg.algorithm)
    with pytest.raises(ConfigError, match=r"reward\.model: unknown reward 'pocket_v2'; registered: .*'pocket'"):
        check_reward_settings(load_config(None, ["reward.model=pocket_v2"]).reward)
    # heads that are a function of the model's options (the simulated stand-in's)
    cfg = load_config(None, ["reward.model='rollout_workers.simulated:fixed_cost'", "reward.options={heads: [A, B]}",
                             "reward.weights={A: 1.0, VQ: 1.0}"])
    with pytest.raises(ConfigError, match=r"'VQ' is not a head of reward model .*fixed_cost' \(its heads: A, B\)"):
        check_reward_settings(cfg.reward)


def test_passwords_in_urls_are_redacted_in_the_dumped_config():
    cfg = load_config(None, ["replay.url='redis://:s3cret-pw@redis.internal:6380/2?prefix=run7'"])
    text = dump_config(cfg)
    assert "s3cret-pw" not in text and "redis://:***@redis.internal:6380/2?prefix=run7" in text
    assert cfg.replay.url == "redis://:s3cret-pw@redis.internal:6380/2?prefix=run7"  # the run itself still has it
    assert redact_secrets("rediss://user:p%40ss@h/0 and file:///a/b") == "rediss://user:***@h/0 and file:///a/b"
    assert redact_secrets("redis://user@host:6379/0") == "redis://user@host:6379/0"  # no password, nothing to hide


def test_a_mistyped_store_url_is_refused_without_showing_its_password():
    with pytest.raises(ConfigError, match=r"replay\.url: Value error, unknown scheme 'redsi' in redsi://:\*\*\*@h:6379/0") as err:
        load_config(None, ["replay.url='redsi://:hunter2@h:6379/0'"])
    assert "hunter2" not in str(err.value)
    assert load_config(None, ["replay.url='rediss://u:pw@h:6380/1?prefix=a'"]).replay.url.startswith("rediss://")
    assert load_config(None, ["replay.url=runs/replay"]).replay.url == "runs/replay"  # a plain directory


def test_the_learner_group_settings_reach_the_learner_and_nft_stays_on_one_learner():
    config = load_config(None, ["run.num_learners=4", "run.learner_num_gpus=1", "run.learner_resources={learner_gpu: 1}"])
    run = config.learner_settings().run
    assert (run.num_learners, run.num_gpus, run.resources) == (4, 1.0, {"learner_gpu": 1.0})
    assert load_config(None).learner_settings().run.num_learners == 1
    with pytest.raises(ConfigError, match="num_learners > 1 needs algorithm.objective copo or sde_grpo"):
        load_config(None, ["run.num_learners=2", "algorithm.objective=nft"])
    with pytest.raises(ConfigError, match="run.num_learners"):
        load_config(None, ["run.num_learners=0"])
