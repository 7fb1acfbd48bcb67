"""Export a trained adapter for diffusers users.

    python -m learner.export --checkpoint DIR --output OUT [--merge-scale S] [--config FILE.yaml] [key.sub=value ...]

`DIR` is a run directory (its newest checkpoint), a checkpoint directory (`checkpoints/iter_000100`)
or a PEFT adapter directory. Writes:

- `OUT/pytorch_lora_weights.safetensors`: the adapter in diffusers' pipeline LoRA format (keys
  `transformer.<module>.lora_A.weight`, the LoRA config in the file's metadata), written by
  `WanPipeline.save_lora_weights`; it loads with `WanPipeline.load_lora_weights(OUT)`.
  The checkpoint's own PEFT files (`base_model.model.` keys) load with PeftModel and
  `load_lora_adapter(prefix="base_model.model")`, but not with the pipeline loader, which looks for
  the `transformer.` prefix.
- with `--merge-scale S`: `OUT/transformer/`, the base transformer with `S x` the adapter merged in,
  saved with `save_pretrained` in diffusers' layout (loads with `WanTransformer3DModel.from_pretrained`).
  The base weights are those of the run's config (`config.yaml` beside the checkpoints, else
  `--config`, else the pocket default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open

from controller.config import ConfigError, load_config
from learner.checkpoint import latest_checkpoint
from policy.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_KEY_PREFIX
from policy.settings import PolicySettings

PIPELINE_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
_PEFT_METADATA_KEY = "lora_adapter_metadata"


class ExportError(ValueError):
    """A checkpoint that cannot be exported, with what is wrong with it."""


def find_adapter(path: str | Path) -> Path:
    """The PEFT adapter directory behind a run, checkpoint or adapter directory."""
    path = Path(path)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return path
    if (path / "adapter" / ADAPTER_CONFIG_FILE).is_file():
        return path / "adapter"
    if (path / "checkpoints").is_dir():
        return latest_checkpoint(path / "checkpoints") / "adapter"
    raise ExportError(f"{path} is neither a run directory, a checkpoint directory nor a PEFT adapter directory")


def read_adapter(adapter: Path) -> tuple[dict, dict]:
    """The adapter's weights under the transformer's module names, and its LoRA config."""
    weights_file = adapter / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        raise ExportError(f"{adapter} has no {ADAPTER_WEIGHTS_FILE}")
    with safe_open(str(weights_file), framework="pt") as f:
        metadata = f.metadata() or {}
        keys = list(f.keys())
        foreign = [k for k in keys if not k.startswith(PEFT_KEY_PREFIX) or "lora_" not in k]
        if foreign:
            raise ExportError(f"{weights_file}: keys {foreign[:3]} are not PEFT LoRA keys ({PEFT_KEY_PREFIX}...lora_...)")
        state = {k.removeprefix(PEFT_KEY_PREFIX): f.get_tensor(k) for k in keys}
    if _PEFT_METADATA_KEY in metadata:  # written by policy.lora.save_adapter: the config under the PEFT prefix
        prefix = PEFT_KEY_PREFIX.rstrip(".") + "."
        config = {k.removeprefix(prefix): v for k, v in json.loads(metadata[_PEFT_METADATA_KEY]).items()}
    else:
        config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    return state, config


def export_pipeline_lora(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the adapter in diffusers' pipeline LoRA format; returns the weights file."""
    from diffusers import WanPipeline

    state, config = read_adapter(find_adapter(checkpoint))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    WanPipeline.save_lora_weights(output, transformer_lora_layers=state, transformer_lora_adapter_metadata=config,
                                  weight_name=PIPELINE_LORA_FILE)
    return output / PIPELINE_LORA_FILE


def export_merged_transformer(checkpoint: str | Path, output: str | Path, scale: float, policy: PolicySettings) -> Path:
    """The base transformer of `policy` with `scale` x the adapter merged in, in diffusers' layout."""
    from policy.factory import build_configured_policy
    from policy.lora import load_adapter, merge_adapters

    transformer = build_configured_policy(policy).transformer
    load_adapter(transformer, find_adapter(checkpoint), "export")
    merged = merge_adapters(transformer, {"export": scale}, inplace=True)
    directory = Path(output) / "transformer"
    merged.save_pretrained(directory)
    return directory


def _run_config(checkpoint: Path, config_file: str | None, overrides: list[str]):
    """`--config` if given, else the config.yaml of the run the checkpoint belongs to, else the pocket default."""
    if config_file is None:
        for parent in (checkpoint, *checkpoint.parents[:3]):
            if (parent / "config.yaml").is_file() and (parent / "checkpoints").is_dir():
                config_file = str(parent / "config.yaml")
                break
    return load_config(config_file, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run, checkpoint or PEFT adapter directory")
    parser.add_argument("--output", required=True, help="directory for the exported files")
    parser.add_argument("--merge-scale", type=float, default=None,
                        help="also save the transformer with this multiple of the adapter merged in")
    parser.add_argument("--config", help="run config naming the base weights (default: the run's config.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of that config, e.g. policy.device=cpu")
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint).resolve()
    try:
        config = _run_config(checkpoint, args.config, args.overrides) if args.merge_scale is not None else None
        lora = export_pipeline_lora(checkpoint, args.output)
        print(f"pipeline LoRA: {lora} (load with WanPipeline.load_lora_weights({args.output!r}))")
        if config is not None:
            merged = export_merged_transformer(checkpoint, args.output, args.merge_scale, config.policy)
            print(f"merged transformer (scale {args.merge_scale:g}): {merged} (WanTransformer3DModel.from_pretrained)")
    except (ExportError, ConfigError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
