"""`train.args` → a TRL config, through TRL's own argument parser.

The same code checks a spec at submit time (in a long-lived validator process, so the API
never imports torch) and builds the config the trainer uses, so what was accepted is what
runs. Each key is passed as `--key value` to `HfArgumentParser(DPOConfig)`, exactly as
`trl dpo --beta 0.1` would, so argparse does the type checking; then the dataclass is built
so its `__post_init__` checks run too.

    python -m charter.pipelines.trl_args --serve    # JSON lines in, JSON lines out
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import io
import json
import sys
import tempfile
from typing import Any

# Keys the service owns: where outputs go and where metrics are reported.
OWNED = {
    "output_dir": "charter writes outputs under the job's artifact folder",
    "logging_dir": "charter writes outputs under the job's artifact folder",
    "report_to": "charter reports metrics as job events; read them with GET /v1/jobs/{id}/events",
    "push_to_hub": "charter returns artifacts through its API; push them yourself afterwards",
    "hub_model_id": "charter does not push to a hub",
    "hub_token": "charter does not push to a hub",
    "hub_strategy": "charter does not push to a hub",
    "hub_private_repo": "charter does not push to a hub",
    "trust_remote_code": "charter never runs code shipped with a model",
    "resume_from_checkpoint": "charter resumes a job from its own checkpoints",
}


def config_class(method: str) -> type:
    """The method's TRL config class. Only that one is imported: trl's lazy module pulls in a
    whole trainer (GRPO's brings vLLM's client code) for each class touched, which cost an
    SFT or DPO job seconds of imports it never used."""
    import trl

    if method == "ppo":
        from trl.experimental.ppo import PPOConfig

        return PPOConfig
    names = {
        "sft": "SFTConfig",
        "dpo": "DPOConfig",
        "reward": "RewardConfig",
        "kto": "KTOConfig",
        "grpo": "GRPOConfig",
        "rloo": "RLOOConfig",
    }
    if method not in names:
        raise ValueError(f"unknown method {method!r}")
    return getattr(trl, names[method])


# charter's CPU-sized defaults per method, used only where train.args leaves the key unset.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {"max_completion_length": 64, "num_generations": 4, "per_device_train_batch_size": 4},
    "rloo": {"max_completion_length": 64, "num_generations": 4, "per_device_train_batch_size": 4},
    "ppo": {"response_length": 64, "per_device_train_batch_size": 4, "stop_token": "eos"},
    "reward": {"max_length": 1024},
}
# (The submit-time check applies them too, so a key checked against TRL's default, e.g.
# num_generations against per_device_train_batch_size, is checked against what will run.)


# Config keys charter sets from the spec instead, per method.
SET_FROM_SPEC = {
    "reward_weights": "set each source's weight in train.rewards",
    "reward_model_path": "name the reward model in train.reward_model",
    "sft_model_path": "the policy is policy.model",
}


def check_train(
    train: dict[str, Any], cpu: bool = True, artifact_root: str | None = None, recipe: bool = False
) -> list[dict[str, Any]]:
    """Everything about a job's `train` section that needs TRL or the operator's modules:
    method-specific requirements, python reward functions, then `train.args` by TRL's parser.
    Reward models named by job id are looked up in `artifact_root` (the API's ARTIFACT_ROOT).
    In a recipe each round trains its own reward model, so ppo and grpo need none named."""
    from charter.spec import TrainSpec

    spec = TrainSpec.model_validate(train)
    errors: list[dict[str, Any]] = []
    m = spec.method
    if m in ("grpo", "rloo") and not spec.rewards and not recipe:
        errors.append(
            {
                "loc": ["train", "rewards"],
                "msg": f"{m} needs at least one reward source, e.g. rewards: [{{type: judge}}] or "
                "[{type: length, max: 64}]",
            }
        )
    if m not in ("grpo", "rloo") and spec.rewards:
        errors.append(
            {"loc": ["train", "rewards"], "msg": f"rewards are read by grpo and rloo only, not {m}; remove them"}
        )
    if m == "ppo" and not spec.reward_model and not recipe:
        errors.append(
            {
                "loc": ["train", "reward_model"],
                "msg": "ppo needs a reward model: set train.reward_model to a `reward` job's id or output folder",
            }
        )
    if m != "ppo" and spec.reward_model:
        errors.append(
            {
                "loc": ["train", "reward_model"],
                "msg": f"reward_model is read by ppo only, not {m}; for grpo/rloo "
                "use rewards: [{type: reward_model, model: …}]",
            }
        )
    if spec.reward_model:
        errors += _reward_model_error(["train", "reward_model"], spec.reward_model, artifact_root)
    for i, src in enumerate(spec.rewards):
        if src.type == "python":
            from charter.pipelines.rewards import load_python

            try:
                load_python(src.function)
            except ValueError as e:
                errors.append({"loc": ["train", "rewards", i, "function"], "msg": str(e)})
        elif src.type == "reward_model":
            errors += _reward_model_error(["train", "rewards", i, "model"], src.model, artifact_root)
    for key in spec.args:
        if key in SET_FROM_SPEC:
            errors.append({"loc": ["train", "args", key], "msg": f"{key} is set by charter: {SET_FROM_SPEC[key]}"})
        value = spec.args[key]
        if key.endswith("model_init_kwargs") and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        if key.endswith("model_init_kwargs") and isinstance(value, dict):
            for owned in sorted({"trust_remote_code", "use_safetensors"} & set(value)):
                errors.append(
                    {
                        "loc": ["train", "args", key, owned],
                        "msg": f"{owned} is set by charter: it never runs code shipped with a model and loads "
                        "safetensors weights only; remove it",
                    }
                )
    return errors or check(m, spec.args, cpu)


def _reward_model_error(loc: list, ref: str, artifact_root: str | None) -> list[dict[str, Any]]:
    from pathlib import Path

    from charter.pipelines.rewards import resolve_reward_model

    try:
        resolve_reward_model(ref, Path(artifact_root) if artifact_root else None)
    except ValueError as e:
        return [{"loc": loc, "msg": str(e)}]
    return []


def _argv(key: str, value: Any) -> list[str]:
    flag = f"--{key}"
    if isinstance(value, bool):
        return [flag, "true" if value else "false"]
    if isinstance(value, list):
        return [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if value is None:
        return [flag, "None"]
    return [flag, str(value)]


def _parse(parser: Any, argv: list[str]) -> tuple[Any | None, str | None]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            (cfg,) = parser.parse_args_into_dataclasses(args=argv)
        return cfg, None
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if "error:" in ln]
        return None, (lines[-1].split("error:", 1)[1].strip() if lines else err.getvalue().strip())
    except (ValueError, TypeError) as e:
        return None, str(e)


def check(method: str, args: dict[str, Any], cpu: bool = True) -> list[dict[str, Any]]:
    """Problems with `args` for `method`, as [{loc, msg}]; empty when TRL accepts them.

    The answer depends on nothing but its inputs, so the validator process keeps the last few
    hundred: a team submitting the same recipe again (or a sweep's shared keys) skips TRL's parser,
    whose config __post_init__ is most of a submit's time once the rest is warm."""
    key = json.dumps([method, args, cpu], sort_keys=True, default=str)
    if key not in _checked:
        if len(_checked) >= 512:
            _checked.pop(next(iter(_checked)))  # the oldest
        _checked[key] = _check(method, args, cpu)
    return copy.deepcopy(_checked[key])


_checked: dict[str, list[dict[str, Any]]] = {}


def _check(method: str, args: dict[str, Any], cpu: bool) -> list[dict[str, Any]]:
    from transformers import HfArgumentParser

    cls = config_class(method)
    fields = {f.name for f in __import__("dataclasses").fields(cls) if f.init}
    errors = []
    for key in args:
        loc = ["train", "args", key]
        if key in OWNED:
            errors.append({"loc": loc, "msg": f"{key} is set by charter, not by a job: {OWNED[key]}"})
        elif key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            errors.append(
                {"loc": loc, "msg": f"{cls.__name__} has no key {key!r}{hint} (see TRL's {cls.__name__} documentation)"}
            )
    if errors:
        return errors
    parser = HfArgumentParser(cls)
    with tempfile.TemporaryDirectory() as out:
        base = ["--output_dir", out] + (["--bf16", "false"] if cpu and "bf16" not in args else [])
        defaults = METHOD_DEFAULTS.get(method, {})
        for key, value in args.items():  # each key alone over charter's defaults: the error names it
            one = {**{k: v for k, v in defaults.items() if k != key}, key: value}
            _, msg = _parse(parser, base + [a for k, v in one.items() for a in _argv(k, v)])
            if msg:
                errors.append({"loc": ["train", "args", key], "msg": f"{cls.__name__} rejects {key}={value!r}: {msg}"})
        if not errors:
            every = {**{k: v for k, v in defaults.items() if k not in args}, **args}
            _, msg = _parse(parser, base + [a for k, v in every.items() for a in _argv(k, v)])
            if msg:
                errors.append({"loc": ["train", "args"], "msg": f"{cls.__name__}: {msg}"})
    return errors


def build(method: str, args: dict[str, Any], output_dir: str, overrides: dict[str, Any]) -> Any:
    """The TRL config a trainer runs with: the user's keys, then charter's own."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_class(method))
    argv = ["--output_dir", output_dir] + [a for k, v in {**args, **overrides}.items() for a in _argv(k, v)]
    cfg, msg = _parse(parser, argv)
    if msg:
        raise ValueError(f"train.args: {msg}")
    return cfg


def serve() -> None:
    """Answer {"train"} (or {"method", "args"}) + "cpu" lines with {"errors": [...]} lines until stdin closes."""
    import transformers  # noqa: F401  (pay the import once, before the first request)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if "train" in req:
                out = {
                    "errors": check_train(
                        req["train"], req.get("cpu", True), req.get("artifact_root"), req.get("recipe", False)
                    )
                }
            else:
                out = {"errors": check(req["method"], req["args"], req.get("cpu", True))}
        except Exception as e:  # a bug here must not take the validator down
            out = {"errors": [{"loc": ["train", "args"], "msg": f"could not check train.args: {e}"}]}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Check train.args with TRL's own parser (used by the API).")
    ap.add_argument("--serve", action="store_true", help="answer JSON-line requests on stdin")
    ap.add_argument("--method", choices=["sft", "dpo", "reward", "kto", "grpo", "rloo", "ppo"])
    ap.add_argument("--args", help="a JSON object of TRL config keys")
    ns = ap.parse_args()
    if ns.serve:
        serve()
    else:
        print(json.dumps(check(ns.method, json.loads(ns.args or "{}")), indent=2))
