"""The job spec: the user-facing contract of a job (YAML or JSON).

    name: harmless-dpo-demo
    policy: {model: smollm2-135m}
    judge: {model: smollm2-135m}            # or base_url: http://host:8000/v1
    constitution: default                   # shipped name, file path, or inline mapping
    prompts: {source: builtin:red-team, limit: 32}   # or dataset: {source: file-…} to train on your own data
    data: {samples_per_prompt: 2, revision_rounds: 1, labels: ai}
    train: {method: dpo, lora: {r: 16, alpha: 32}, args: {beta: 0.1}}
    evaluate: {prompts: builtin:red-team-heldout, limit: 32}

or the whole Constitutional-AI recipe as one job (SL-CAI, then N rounds of RL-CAI, then an
evaluation against the base and against the SFT policy; docs/recipe.md), e.g.

    recipe: constitutional-ai
    rounds: 2                               # RL-CAI rounds, each from the newest policy
    sft: {args: {max_steps: 50}}            # the SL-CAI SFT step (SFTConfig keys)
    reward: {args: {max_steps: 50}}         # each round's reward model (RewardConfig keys; ppo, grpo)
    train: {method: ppo, lora: {r: 16, alpha: 32}}   # the RL step: ppo (default), dpo or grpo

or, for online RL, e.g.

    train:
      method: grpo                          # or rloo; ppo takes reward_model: <reward job id> instead
      rewards: [{type: judge, weight: 0.8}, {type: length, max: 120, weight: 0.2}]
      monitors: {max_kl: 0.5, max_length_factor: 3, stop: true}
      args: {beta: 0.04, num_generations: 4}

Any method trains on several processes with `train: {…, launcher: accelerate, num_processes: 2}`.

Every model here forbids unknown keys, so a typo is a 422 naming the field. The checks that
need the outside world (does the model exist, does TRL accept `train.args`) live in
`charter.validation`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from charter.graders import Grader


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicySpec(_Strict):
    model: str = Field(
        description="A prepared model name (see `charter models list`), an HF model id, or a local path."
    )


class JudgeSpec(_Strict):
    model: str | None = Field(None, description="The judge model; defaults to the policy's model.")
    base_url: str | None = Field(
        None,
        description="An OpenAI-compatible vLLM server, e.g. http://host:8000/v1; several separated by commas. Absent: charter starts and owns a local vLLM server.",
    )
    served_model_name: str | None = Field(
        None, description="The model name the remote server expects; defaults to the one it lists first."
    )
    max_concurrency: int = Field(64, ge=1, le=1024, description="Requests in flight to the judge at once.")
    few_shot: bool = Field(
        False,
        description="Put the constitution's few-shot examples before each critique and revision request. "
        "They help small judges keep the format but make every judge prompt several hundred tokens longer.",
    )
    max_tokens: int = Field(
        64, ge=8, le=4096, description="Token budget of a critique or a revision (sized for CPUs; raise it on GPUs)."
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    timeout_s: float = Field(300.0, gt=0, description="Seconds before one judge request is abandoned and retried.")
    retries: int = Field(3, ge=0, le=10, description="Retries of a request that failed in transport or did not parse.")


class PromptsSpec(_Strict):
    source: str = Field(
        description="builtin:red-team, builtin:red-team-heldout, builtin:helpful, builtin:helpful-heldout, or a JSONL path with a `prompt` column."
    )
    limit: int | None = Field(None, ge=1, description="Use the first N prompts.")


class DatasetSpec(_Strict):
    source: str = Field(
        description="An uploaded file (file-…, see POST /v1/files) or a local JSONL path: SFT rows (`messages`, or "
        "prompt/completion) for sft, preference rows (prompt/chosen/rejected) for dpo. Generation is skipped."
    )
    limit: int | None = Field(None, ge=1, description="Use the first N rows.")
    validation: str | None = Field(
        None,
        description="A second file (file-… or JSONL path) of the same kind, never trained on: the trainer's "
        "eval_dataset, its loss logged as eval_loss (OpenAI's valid_loss) every eval_steps and at the end.",
    )


class DataSpec(_Strict):
    samples_per_prompt: int = Field(2, ge=1, le=16, description="Policy samples per prompt.")
    revision_rounds: int = Field(1, ge=1, le=8, description="Critique→revise rounds, a freshly sampled principle each.")
    labels: Literal["ai", "revision"] = Field(
        "ai", description="ai: the judge compares two samples (RL-CAI); revision: revision ≻ original (SL-CAI)."
    )
    disagreement: Literal["keep", "drop"] = Field(
        "keep", description="Pairs whose two judge orders disagree: keep them with low confidence, or drop them."
    )
    min_confidence: float = Field(
        0.0, ge=0.0, le=1.0, description="Drop AI-labelled pairs below this confidence (|2p-1|)."
    )
    max_new_tokens: int = Field(
        64, ge=8, le=4096, description="Token budget of a policy sample (sized for CPUs; raise it on GPUs)."
    )
    temperature: float = Field(0.9, ge=0.0, le=2.0, description="Policy sampling temperature.")
    seed: int = 0

    @model_validator(mode="after")
    def _ai_needs_two(self) -> DataSpec:
        if self.labels == "ai" and self.samples_per_prompt < 2:
            raise ValueError(
                "labels: ai compares two samples of each prompt; set samples_per_prompt: 2 or more, or use labels: revision"
            )
        return self


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(
        "all-linear", description="peft target_modules: a list of module names or 'all-linear'."
    )


class _Source(_Strict):
    weight: float = Field(1.0, description="This source's weight in the summed reward (TRL's reward_weights).")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="The name its metrics carry; defaults to its type."
    )


class RewardModelSource(_Source):
    type: Literal["reward_model"]
    model: str = Field(description="A `reward` job's id, or the path of its adapter/ or model/ folder.")


class JudgeSource(_Source):
    type: Literal["judge"]


class ExactSource(_Source):
    type: Literal["exact"]
    value: str = Field(description="1 when the completion, stripped, equals this; else 0.")
    case_sensitive: bool = True


class RegexSource(_Source):
    type: Literal["regex"]
    pattern: str = Field(description="1 when this Python regex matches anywhere in the completion; else 0.")
    full_match: bool = Field(False, description="Require the whole stripped completion to match.")

    @model_validator(mode="after")
    def _compiles(self) -> RegexSource:
        import re

        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"pattern is not a valid regular expression: {e}") from None
        return self


class ContainsSource(_Source):
    type: Literal["contains"]
    values: list[str] = Field(min_length=1, description="Substrings to look for.")
    mode: Literal["any", "all", "none"] = Field(
        "any", description="any: 1 if one is present; all: the fraction present; none: 1 if none is present."
    )
    case_sensitive: bool = False


class JsonSchemaSource(_Source):
    # `schema` is the user-facing key; pydantic reserves the attribute name.
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(
        alias="schema", description="1 when the completion parses as JSON and validates against this JSON Schema."
    )

    @model_validator(mode="after")
    def _valid_schema(self) -> JsonSchemaSource:
        import jsonschema

        try:
            jsonschema.validators.validator_for(self.json_schema).check_schema(self.json_schema)
        except jsonschema.SchemaError as e:
            raise ValueError(f"schema is not a valid JSON Schema: {e.message}") from None
        return self


class LengthSource(_Source):
    type: Literal["length"]
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=1)
    unit: Literal["chars", "words"] = "words"

    @model_validator(mode="after")
    def _bounds(self) -> LengthSource:
        if self.min is None and self.max is None:
            raise ValueError("set min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class PythonSource(_Source):
    type: Literal["python"]
    function: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="module:function in a module the operator listed in CHARTER_REWARD_MODULES; called as a TRL "
        "reward function f(prompts, completions, **kwargs) -> list[float].",
    )


class GraderSource(_Source):
    type: Literal["grader"]
    grader: Grader = Field(
        description="An OpenAI grader (string_check, text_similarity, score_model, multi; see charter/graders.py) "
        "reading the training row's fields as {{item.<field>}} and the sample as {{sample.output_text}}."
    )


RewardSource = Annotated[
    RewardModelSource
    | GraderSource
    | JudgeSource
    | ExactSource
    | RegexSource
    | ContainsSource
    | JsonSchemaSource
    | LengthSource
    | PythonSource,
    Field(discriminator="type"),
]


class ProbeSpec(_Strict):
    prompts: str = Field("builtin:red-team-heldout", description="A prompt source, as in prompts.source.")
    limit: int = Field(8, ge=2, le=256, description="Probe prompts (small: the probe pauses training).")
    every: int = Field(10, ge=1, description="Probe every N optimizer steps.")
    max_new_tokens: int = Field(48, ge=8, le=1024, description="Token budget of each probe answer.")
    min_drop: float = Field(
        0.1, gt=0.0, le=1.0, description="Warn when the probe win rate falls by this much while the reward rises."
    )


class MonitorsSpec(_Strict):
    max_kl: float | None = Field(None, gt=0, description="Warn when the logged KL to the reference exceeds this.")
    max_length_factor: float | None = Field(
        None, gt=1, description="Warn when mean completion length moves past this factor of its first logged value."
    )
    probe: ProbeSpec | None = Field(
        None,
        description="Every `every` steps the judge compares the policy's answers on a few held-out prompts with the "
        "starting policy's (`probe_win_rate`); warns when the reward rises while that win rate falls.",
    )
    stop: bool = Field(False, description="Stop training (the job fails, saying why) when a monitor fires.")


METHODS = ("sft", "dpo", "reward", "kto", "grpo", "rloo", "ppo")


class TrainSpec(_Strict):
    method: Literal["sft", "dpo", "reward", "kto", "grpo", "rloo", "ppo"] = Field(
        description="sft on the final revisions; dpo, reward (Bradley–Terry) and kto on the preference pairs; "
        "grpo and rloo on the prompts with train.rewards; ppo on the prompts with train.reward_model."
    )
    lora: LoraSpec | None = Field(None, description="LoRA settings; absent means full fine-tuning.")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of the method's TRL config (SFTConfig, DPOConfig, RewardConfig, KTOConfig, GRPOConfig, "
        "RLOOConfig, PPOConfig), checked by TRL's own parser at submit time.",
    )
    rewards: list[RewardSource] = Field(
        default_factory=list, description="grpo/rloo: the reward sources, summed with their weights."
    )
    reward_model: str | None = Field(
        None, description="ppo: a `reward` job's id, or the path of its adapter/ or model/ folder."
    )
    monitors: MonitorsSpec = Field(default_factory=MonitorsSpec)
    heldout_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="reward: the share of pairs held out to report accuracy and margin."
    )
    launcher: Literal["local", "accelerate"] = Field(
        "local",
        description="local: the trainer runs inside the job process; accelerate: under `accelerate launch` "
        "with num_processes data-parallel ranks (gloo on CPUs, one GPU each otherwise).",
    )
    num_processes: int = Field(1, ge=1, le=64, description="accelerate: how many ranks (processes) train.")
    accelerate_config: Literal["ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"] | None = Field(
        None,
        description="accelerate, GPUs only: the shipped accelerate config (charter/pipelines/accelerate_configs/); "
        "absent means ddp. deepspeed-* needs the deepspeed package on the worker (pip install 'charter[deepspeed]').",
    )

    @model_validator(mode="after")
    def _launcher(self) -> TrainSpec:
        if self.launcher == "local" and (self.num_processes != 1 or self.accelerate_config):
            raise ValueError("num_processes and accelerate_config need launcher: accelerate")
        return self


class EvaluateSpec(_Strict):
    prompts: str = Field(description="A prompt source, as in prompts.source.")
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=8, le=4096, description="Token budget of each evaluation answer.")


RECIPE_METHODS = ("ppo", "dpo", "grpo")  # the RL step of the recipe
RECIPE_SECTIONS = ("rounds", "sft", "reward")  # read only with recipe:


class StepSpec(_Strict):
    """A training step of the recipe besides its RL step; its LoRA settings are train.lora's."""

    args: dict[str, Any] = Field(
        default_factory=dict, description="Keys of the step's TRL config (SFTConfig for sft, RewardConfig for reward)."
    )


class ResourcesSpec(_Strict):
    labels: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,40}$")]] = Field(
        default_factory=list,
        max_length=8,
        description="Worker labels the job needs, e.g. [gpu]: only a worker started with all of them "
        "(`charter worker --labels gpu`) takes it.",
    )


class JobSpec(_Strict):
    name: str = Field(min_length=1, max_length=200)
    recipe: Literal["constitutional-ai"] | None = Field(
        None,
        description="constitutional-ai: SL-CAI (generate → critique → revise → SFT), then `rounds` of RL-CAI "
        "(sample pairs from the newest policy → judge labels → reward model → train.method), then evaluate "
        "against the base and the SFT policy. Absent: one stage chain for train.method.",
    )
    rounds: int | None = Field(None, ge=1, le=8, description="recipe: RL-CAI rounds, each from the newest policy.")
    sft: StepSpec | None = Field(None, description="recipe: the SL-CAI SFT step on the final revisions.")
    reward: StepSpec | None = Field(None, description="recipe: each round's reward model (ppo and grpo).")
    policy: PolicySpec
    judge: JudgeSpec = Field(default_factory=JudgeSpec)
    constitution: str | dict[str, Any] = "default"
    prompts: PromptsSpec | None = Field(None, description="Prompts the constitutional loop generates data from.")
    dataset: DatasetSpec | None = Field(None, description="Train on this dataset instead of generating one.")
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec
    evaluate: EvaluateSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    metadata: dict[str, str] = Field(
        default_factory=dict, max_length=16, description="Labels kept with the job and shown back (OpenAI's metadata)."
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_default_method(cls, raw: Any) -> Any:
        # The recipe's RL step is ppo unless the spec says otherwise; only there may train be left out.
        if isinstance(raw, dict) and raw.get("recipe") and isinstance(raw.get("train", {}), dict):
            train = raw.get("train", {})
            if "method" not in train:
                raw = {**raw, "train": {**train, "method": "ppo"}}
        return raw

    @model_validator(mode="after")
    def _one_source(self) -> JobSpec:
        if (self.prompts is None) == (self.dataset is None):
            raise ValueError(
                "give exactly one of prompts (generate data with the constitution) or dataset (train on your own data)"
            )
        return self

    @property
    def needs_servers(self) -> bool:
        """Whether the job talks to a policy or judge server: not when it only trains on a dataset."""
        return (
            self.prompts is not None
            or self.evaluate is not None
            or self.train.monitors.probe is not None
            or self.judge_in_rewards
        )

    @property
    def judge_in_rewards(self) -> bool:
        """A reward scored by the judge server: `judge`, or a grader with a score_model."""
        from charter.graders import needs_judge

        return any(r.type == "judge" or (r.type == "grader" and needs_judge(r.grader)) for r in self.train.rewards)

    @property
    def rl_rounds(self) -> int:
        return self.rounds or 1

    @property
    def judge_model(self) -> str:
        return self.judge.model or self.policy.model


def recipe_errors(spec: JobSpec) -> list[dict[str, Any]]:
    """What a spec's recipe fields get wrong, as [{loc, msg}] (checked at submit and by the job)."""
    if not spec.recipe:
        return [
            {"loc": [k], "msg": f"{k} is read by recipe: constitutional-ai only; add that or remove {k}"}
            for k in RECIPE_SECTIONS
            if getattr(spec, k) is not None
        ]
    errors = []
    m = spec.train.method
    if m not in RECIPE_METHODS:
        errors.append(
            {
                "loc": ["train", "method"],
                "msg": f"the recipe's RL step is one of {', '.join(RECIPE_METHODS)}, not {m}; "
                + ("its SFT step is set under sft:" if m == "sft" else "leave train.method out for ppo"),
            }
        )
    if spec.dataset is not None:
        errors.append(
            {"loc": ["dataset"], "msg": "the recipe generates its own data: give prompts: instead of dataset:"}
        )
    if spec.data.labels != "ai":
        errors.append(
            {
                "loc": ["data", "labels"],
                "msg": "the recipe's SFT step trains on the revisions and its RL rounds on the judge's labels; "
                "remove labels: revision",
            }
        )
    if spec.train.reward_model:
        errors.append(
            {
                "loc": ["train", "reward_model"],
                "msg": "the recipe trains a reward model in every round; remove train.reward_model "
                "(set its training under reward: {args: …})",
            }
        )
    if spec.reward is not None and m not in ("ppo", "grpo"):
        errors.append({"loc": ["reward"], "msg": f"reward is trained for ppo and grpo only, not {m}; remove it"})
    if spec.evaluate is None:
        errors.append(
            {
                "loc": ["evaluate"],
                "msg": "the recipe ends by comparing its policy with the base and the SFT policy; add e.g. "
                "evaluate: {prompts: builtin:red-team-heldout, limit: 32}",
            }
        )
    return errors
