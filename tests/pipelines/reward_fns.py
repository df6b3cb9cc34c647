"""A module an operator would list in CHARTER_REWARD_MODULES: TRL-style reward functions."""


def brevity(prompts, completions, **kwargs):
    """1 for an empty answer, falling towards 0 as it grows (in characters)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 / (1.0 + len(t) / 20) for t in texts]


NOT_A_FUNCTION = 3


def fails_on_rank_1(prompts, completions, **kwargs):
    """Scores 0 on every rank but the second, which raises: a rank that fails mid-training."""
    import os

    if os.environ.get("RANK") == "1":
        raise ValueError("rank 1 refuses to score")
    return [0.0 for _ in completions]
