"""charter: a constitutional post-training service.

A job runs Anthropic's Constitutional AI loop — a policy answers prompts, a vLLM-hosted
judge critiques, revises and labels them against a constitution — and trains the policy
with TRL. See README.md for the two commands to start with (`make demo`, `make test`).
"""

__version__ = "0.1.0"
